"""The benchmark CLI: ``python -m benchmarks <scenario>``."""
