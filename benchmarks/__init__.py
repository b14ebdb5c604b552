"""Reproducible benchmarks of cstar (see docs/benchmarks.md); scripts run as `python benchmarks/NAME.py`."""
