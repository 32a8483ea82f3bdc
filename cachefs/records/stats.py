"""The counters of a member's record store and replication (``statistics()``)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StoreStatistics"]


@dataclass
class StoreStatistics:
    local_changes: int = 0  # adds, updates and deletes made here
    applied: int = 0  # changes from elsewhere applied
    stale: int = 0  # changes from elsewhere already held or older
    rejected: int = 0  # changes that failed a check: never applied
    expired: int = 0  # EXPIRED events raised
    refreshed: int = 0  # AUTOREFRESH records republished
    watchers: int = 0  # open event subscriptions
    watchers_dropped: int = 0  # subscriptions ended for falling too far behind
