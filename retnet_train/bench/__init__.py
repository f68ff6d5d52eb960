"""Benchmarks: each prints one JSON line per measured configuration."""
