"""cstar: compact, structured, adversarially robust CNNs (CSTAR) and their deployment.

Importing this package is cheap and torch-free: the device side (deploy) relies on that.
"""

__version__ = "0.1.0"
