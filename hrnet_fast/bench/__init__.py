"""Benchmark helpers shared by `hrnet-fast bench` and the per-op scripts in benchmarks/."""
