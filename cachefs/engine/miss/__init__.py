"""The miss path.

Reads that miss, ReadData transfers and calls, storing blocks, readahead,
hashing fetched blocks, data supplied from elsewhere.
"""
