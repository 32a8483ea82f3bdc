"""Disk state of the cache.

The directory, its index, data files, encryption at rest, the disk's health,
when the index is committed, blocks in flight, and the threads that read
the disk.
"""
