"""Passes that change the model: one per module (canonicalize, prune, …)."""
