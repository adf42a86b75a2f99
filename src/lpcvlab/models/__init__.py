"""Model factories and export wrappers."""
