"""The mount daemon: the one place that wires engine, fs, FUSE transport and backends."""
