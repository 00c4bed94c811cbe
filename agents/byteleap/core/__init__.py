"""Shared, I/O-light building blocks used by every agent.

`core` never imports an agent package (worker, miner, validator, gateway) nor `chain`.
"""
