"""Parsers of model output on the server: reasoning (thinking apart from the answer)."""
