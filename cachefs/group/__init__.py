"""A mount's membership of a group: the hosted cache client, content records,
and what the mount does on group records (node status, versions, pins).

Knows the engine only through the narrow interfaces in
:mod:`cachefs.group.ports`; wired in cachefs.daemon.
"""
