"""Serving: the dialogue format, the model engine and which version it serves."""
