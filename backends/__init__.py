"""Backends and wrappers, found by URL scheme through cachefs.registry."""
