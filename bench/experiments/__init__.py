"""Experiments: servers and settings measured on request, not in the default set."""
