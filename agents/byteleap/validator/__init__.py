"""byteleap-validator: challenges idle workers, verifies, scores, sets weights."""
