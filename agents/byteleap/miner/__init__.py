"""byteleap-miner: aggregates up to 100 workers and relays validators' challenges to them."""
