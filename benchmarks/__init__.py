"""Benchmarks (not tests): timing and memory measurements, runnable as python -m benchmarks.<name>."""
