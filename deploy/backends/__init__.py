"""deploy/backends package."""
