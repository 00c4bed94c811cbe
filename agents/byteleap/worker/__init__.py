"""byteleap-worker: reports hardware, runs compute challenges and leased VMs on a GPU host."""
