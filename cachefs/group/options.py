"""How a mount takes part in its group, as data: what ``cachefs mount`` checks
and hands the daemon.  Imports nothing of the record store, so that every
cachefs command does not pay for loading it (and its Redis client)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: whose content records a mount takes (cachefs.group.content): the first is the default
TRUST_MODES = ("members", "admins")


@dataclass(frozen=True, slots=True)
class MemberOptions:
    """``cachefs mount --group ...``."""

    group: str
    groups_dir: Path | None = None
    #: the hosted cache's URL (s3://bucket/prefix or a directory), None for none
    shared_cache: str | None = None
    #: keyword options of the hosted cache's blob store factory (its S3 endpoint)
    shared_cache_options: dict[str, Any] = field(default_factory=dict)
    trust_content: str = TRUST_MODES[0]
    #: the node status record's lifetime in seconds (rewritten every third of it)
    status_expiry: float = 60.0
