"""Sotto generated wire contract packages."""
