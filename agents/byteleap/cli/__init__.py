"""byteleapctl: the operator's command line."""
