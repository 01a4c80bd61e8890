"""Benchmarks and experiments, run from the repository root as `python -m bench.NAME`."""
