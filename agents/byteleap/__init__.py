"""ByteLeap agents: worker, miner, validator and gateway for the ByteLeap GPU compute subnet."""

__version__ = "0.1.0"
