"""Pluggable model backends: ``http`` (an existing model server) and ``torch`` (the local runner)."""
