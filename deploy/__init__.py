"""Runtime side: backends, engine building, inference, benchmark, robustness verification, reports.

The device-side modules (backends, verify, bench, predict) import numpy and the runtime only, never torch.
"""
