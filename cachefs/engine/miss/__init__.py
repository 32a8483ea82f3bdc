"""The miss path.

ReadData transfers, readahead, hashing fetched blocks, data supplied from
elsewhere.
"""
