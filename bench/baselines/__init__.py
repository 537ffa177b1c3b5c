"""Baseline chat servers the suite measures roomcast against (same wire protocol)."""
