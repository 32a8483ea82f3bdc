"""The hit path.

Present blocks served from the data files, O_DIRECT streams, whole files for
passthrough.
"""
