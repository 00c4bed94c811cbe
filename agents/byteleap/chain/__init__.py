"""Chain access: the ChainPort and its adapters (devnet SQLite, bittensor)."""
