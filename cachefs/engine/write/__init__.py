"""The write path: working copies of changed files, flushed with WriteData."""
