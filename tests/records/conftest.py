"""Fixtures of the group-record tests: a real redis-server per test (``redis_server``)."""

from __future__ import annotations

from redisserver import redis_server

__all__ = ["redis_server"]
