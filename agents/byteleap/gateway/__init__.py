"""byteleap-gateway: enrolls workers under its own CA, rents their GPUs out, signs lease records."""
