"""The worker daemon: runs on each GPU host and reports to its miner."""
