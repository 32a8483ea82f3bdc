"""The filesystem over the engine.

Operations (the only errno translation), inodes, passthrough. It knows no FUSE
transport.
"""
