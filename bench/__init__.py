"""Benchmarks that print a table: run each as `python -m bench.<name>` from the repository root."""
