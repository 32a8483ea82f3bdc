"""Property: random reads over random files return exactly the source bytes."""

from __future__ import annotations

import tempfile
from pathlib import Path

import trio
from enginerig import Rig
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachefs.engine.miss.reads import MAX_REPLANS

BS = 4096

files = st.dictionaries(
    st.sampled_from(["a", "b", "d/c"]),
    st.binary(max_size=5 * BS + 17),
    min_size=1,
)
reads = st.lists(
    st.tuples(st.sampled_from(["a", "b", "d/c"]), st.integers(0, 6 * BS), st.integers(0, 3 * BS)),
    max_size=25,
)
# Faults that eventually succeed: a few failures, short answers, a replan
# (fewer in a row than a read re-plans before it gives up: MAX_REPLANS).
faults = st.lists(
    st.fixed_dictionaries(
        {
            "file": st.sampled_from(["*", "a", "d/*"]),
            "result": st.sampled_from(["FAILURE", "PARTIAL", "FILE_MODIFIED_LOCALLY"]),
            "count": st.integers(1, 2),
        },
        optional={"max_bytes": st.integers(1, 2 * BS)},
    ),
    max_size=3,
).filter(
    lambda rules: (
        sum(r["count"] for r in rules if r["result"] == "FILE_MODIFIED_LOCALLY") < MAX_REPLANS
    )
)


def check(source: dict[str, bytes], plan: list[tuple[str, int, int]], rules: list) -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            rig = Rig(Path(tmp), source)
            rig.faults(rules)
            for _ in range(2):  # cold, then again on the same cache dir
                async with rig.engine(
                    block_size=BS, max_fetch=2 * BS, retries=8, max_readahead=8 * BS
                ) as cache:
                    handles = {}
                    for name, offset, length in plan:
                        if name not in source:
                            continue
                        if name not in handles:
                            handles[name] = await cache.open(name)
                        got = await cache.read(handles[name], offset, length)
                        assert got == source[name][offset : offset + length]
                    for fh in handles.values():
                        await cache.close(fh)

    trio.run(main)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files, reads)
def test_random_reads_return_the_source_bytes(source, plan):
    check(source, plan, [])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files, reads, faults)
def test_random_reads_with_transient_faults_return_the_source_bytes(source, plan, rules):
    check(source, plan, rules)
