"""Which cached files a command naming paths acts on (purge, unpin,
reset-file-errors): every file at or below a named path, and nothing else.
(The lookup is a set of the named paths checked against each file's
ancestors: a request naming 90,000 paths over 3,000 cached files held the
mount's loop for 25 s when every path was compared with every file.)"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cachefs.daemon.commands import _below, _unmatched

names = st.sampled_from(["a", "b", "ab", "a.b", "é"])
file_ids = st.lists(names, min_size=1, max_size=4).map("/".join)


def contains(root: str, file_id: str) -> bool:
    return root == "" or file_id == root or file_id.startswith(root + "/")


@given(st.lists(st.one_of(st.just(""), file_ids), max_size=6), st.sets(file_ids, max_size=12))
def test_below_and_unmatched_are_the_plain_definitions(roots: list[str], ids: set[str]) -> None:
    below = _below(roots, ids)
    assert below == sorted(f for f in ids if any(contains(r, f) for r in roots))
    assert _unmatched(roots, below) == [r for r in roots if not any(contains(r, f) for f in ids)]
