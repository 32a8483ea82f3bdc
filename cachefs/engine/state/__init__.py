"""Disk state of the cache.

The directory, its index, data files, encryption at rest, the disk's health.
"""
