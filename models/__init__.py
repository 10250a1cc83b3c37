"""Model and policy files shipped with Sotto (package data, found with importlib.resources)."""
