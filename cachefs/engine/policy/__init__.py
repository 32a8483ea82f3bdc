"""Policy: eviction and the size cap, verify-before-serve of content
information, periodic commits and the probe of a latched disk."""
