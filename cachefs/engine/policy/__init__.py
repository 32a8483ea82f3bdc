"""Policy: eviction and the size cap, verify-before-serve of content information."""
