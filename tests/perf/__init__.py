"""Benchmarks (`make bench`): figures as ratios measured in one run, written as JSON."""
