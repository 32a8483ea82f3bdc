"""The benchmark suite of issue 6: ``python -m bench`` (``--help`` for the options).

It makes its own data under a work dir, measures raw / cachefs / rclone
mount under cold, cache-hit and warm conditions (and cachefs --encrypt on
cache hits and warm, against plain cachefs), reads a file cold through
the throttled backend, and writes JSON, Markdown and a PNG chart to
bench/results/.
"""
