"""The control requests: every typed request survives its line, the mount's side
reads it back, and the client takes only replies of its request's shape; which
cached files a command naming paths acts on (purge, unpin, reset-file-errors):
every file at or below a named path, and nothing else, whatever the number of
paths."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachefs.control.protocol import (
    AddData,
    MountRequest,
    Pin,
    Prefetch,
    Purge,
    ResetExternalError,
    ResetFileErrors,
    Stats,
    Unmount,
    Unpin,
    decode_line,
    decode_request,
    encode,
)
from cachefs.daemon.commands import _below, _unmatched
from cachefs.errors import ConfigError

names = st.sampled_from(["a", "b", "ab", "a.b", "é"])
file_ids = st.lists(names, min_size=1, max_size=4).map("/".join)


def contains(root: str, file_id: str) -> bool:
    return root == "" or file_id == root or file_id.startswith(root + "/")


@given(st.lists(st.one_of(st.just(""), file_ids), max_size=6), st.sets(file_ids, max_size=12))
def test_below_and_unmatched_are_the_plain_definitions(roots: list[str], ids: set[str]) -> None:
    below = _below(roots, ids)
    assert below == sorted(f for f in ids if any(contains(r, f) for r in roots))
    assert _unmatched(roots, below) == [r for r in roots if not any(contains(r, f) for f in ids)]


ids = st.lists(st.text(max_size=8), max_size=4).map(tuple)
requests = st.one_of(
    st.sampled_from([Stats(), Unmount(), ResetExternalError()]),
    st.builds(Prefetch, ids),
    st.builds(Pin, ids),
    st.builds(Unpin, ids),
    st.builds(Purge, ids),
    st.builds(ResetFileErrors, ids),
    st.builds(AddData, st.text(max_size=8), st.integers(0, 1 << 62), st.binary(), st.booleans()),
)


@given(requests)
def test_a_request_reaches_the_mount_as_sent(request: MountRequest) -> None:
    line = encode({"command": request.command, **request.arguments()})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_request(decode_line(line[:-1])) == request


@pytest.mark.parametrize(
    ("message", "words"),
    [
        ({"command": "nope"}, "unknown control command 'nope'"),
        ({"command": "purge"}, "purge needs a list of file ids"),
        ({"command": "add-data", "file_id": "f", "offset": 0}, "malformed add-data request"),
        ({"command": "add-data", "file_id": "f", "offset": 0, "data": "!"}, "malformed add-data"),
    ],
)
def test_a_request_the_mount_cannot_serve_is_a_config_error(
    message: dict[str, object], words: str
) -> None:
    with pytest.raises(ConfigError, match=words):
        decode_request(message)


@pytest.mark.parametrize(
    ("req", "good", "bad"),
    [
        (Unmount(), {"pid": 7}, [{"pid": "7"}, {}, [7], {"pid": True}]),
        (Stats(), {"hit_ratio": None}, [None, [1], "stats"]),
        (
            Prefetch(("a",)),
            {
                "files": 1,
                "succeeded": 0,
                "bytes": 3,
                "fetched": 0,
                "failed": [{"file": "a", "error": "a: gone", "exit_code": 1}],
            },  # fmt: skip
            [
                {"files": 1, "succeeded": 0, "bytes": 3, "fetched": 0, "failed": [{"file": "a"}]},
                {"files": 1, "succeeded": 0, "bytes": 3, "fetched": 0},
                {"files": 1, "succeeded": 0, "bytes": 3, "fetched": 0, "failed": [], "warning": 1},
            ],
        ),
        (Unpin(("a",)), {"unpinned": ["a"], "not_pinned": []}, [{"unpinned": "a"}]),
        (Purge(("a",)), {"purged": 1, "freed": 2, "pinned": []}, [{"purged": 1, "freed": 2}]),
        (ResetFileErrors(("a",)), ["a"], [[1], "a", None]),
        (AddData("f", 0, b""), {"accepted": 0, "rejected": 0, "pending": 1}, [{"accepted": 0}]),
    ],
)
def test_the_client_takes_replies_of_its_requests_shape(
    req: MountRequest, good: object, bad: list[object]
) -> None:
    assert req.reply(good) == good
    for reply in bad:
        with pytest.raises(ValueError):
            req.reply(reply)
