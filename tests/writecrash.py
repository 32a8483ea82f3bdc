"""A writer whose every change can be checked after a crash: the model of the write crash suite.

The writer (``python writecrash.py SPEC``, a process of its own) changes a
few files through a mount with seeded operations: it creates the new ones,
opens the others, writes seeded bytes (appends, overwrites, writes past the
end that leave a hole), truncates, fsyncs, closes and opens again.  Before
each operation it logs what it is about to do, after it what the call
answered, to a log outside the mount (fsynced whenever it fsynced a file):
an operation answered is *acknowledged*, a write as far as it says it
wrote (a write answered short is written on by the next operation, as
writers do: the kernel cuts a write into requests, and the daemon may die
between them).  It stops at its first error (the daemon was killed:
ENOTCONN) and logs that too.

:class:`History` replays the log.  Once the next mount has flushed what the
killed one left, the source must hold each file exactly as the acknowledged
operations left it, or as the one operation under way at the kill (begun,
never answered, or answered with an error) would have left it.  A write
under way may also have landed in part: each page of the file then holds
either state, and pages past the acknowledged end of the file may read as
zeros (the file grew there, the write's bytes did not arrive).  Any other
byte is a wrong byte; a file acknowledged and missing is a lost file; a
file in the source that no acknowledged operation made is an extra one.

The bytes are never stored: a write's are ``written(seed, k, n)``, a
file's first content ``initial(seed, name, size)``; the log holds the
sizes and a digest at every fsync (which the replay checks against its own).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import sys
from dataclasses import dataclass, field, replace

PAGE = 4096
#: What the writer's calls may fail with once the daemon is gone.
DEAD_MOUNT = frozenset({errno.ENOTCONN, errno.ECONNABORTED})
#: Lengths of the writes, small ones more often.
LENGTHS = [1, 100, 4095, PAGE, PAGE, 2 * PAGE, 10_000, 65_536, 65_536, 2 * 65_536 + 7, 300_001]
#: (kind, weight) of the operations on a file already open.
ACTIONS = [("write", 60), ("fsync", 14), ("truncate", 5), ("close", 8)]


def written(seed: int, k: int, n: int) -> bytes:
    """The bytes operation *k* of the writer seeded *seed* writes."""
    return hashlib.shake_256(f"{seed}/op/{k}".encode()).digest(n)


def initial(seed: int, name: str, size: int) -> bytes:
    """What *name* holds before the writer starts (the test puts it in the source)."""
    return hashlib.shake_256(f"{seed}/file/{name}".encode()).digest(size)


def digest(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


@dataclass(frozen=True)
class Op:
    """One operation of the writer: *a* and *b* are the write's offset and
    length, or the size a truncation sets.  A write answered short is
    written on by the next operation: its bytes are then bytes *skip*... of
    the ones operation *src* was to write."""

    k: int
    kind: str
    name: str
    a: int = 0
    b: int = 0
    src: int = 0
    skip: int = 0

    def line(self) -> str:
        return f"B {self.k} {self.kind} {self.name} {self.a} {self.b} {self.src} {self.skip}\n"

    def data(self, seed: int) -> bytes:
        """What a write writes."""
        return written(seed, self.src or self.k, self.skip + self.b)[self.skip :]

    def rest(self, done: int) -> Op:
        """The write of what this write, answered *done*, did not write."""
        src = self.src or self.k
        return Op(0, "write", self.name, self.a + done, self.b - done, src, self.skip + done)

    def apply(self, seed: int, data: bytearray | None, done: int) -> bytearray | None:
        """The file *data* after this operation (*done*: bytes a write stored)."""
        if self.kind == "create":
            return bytearray() if data is None else data
        assert data is not None, self
        if self.kind == "write":
            if self.a > len(data):
                data.extend(bytes(self.a - len(data)))
            data[self.a : self.a + done] = self.data(seed)[:done]
        elif self.kind == "truncate":
            if self.a < len(data):
                del data[self.a :]
            else:
                data.extend(bytes(self.a - len(data)))
        return data


@dataclass
class Spec:
    """What the writer is told: where to write and log, its seed, and its
    files (the size each holds at the start, None for the ones it creates)."""

    root: str
    log: str
    seed: int
    files: dict[str, int | None]
    max_size: int = 2 << 20

    def dumps(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def loads(cls, raw: str) -> Spec:
        return cls(**json.loads(raw))

    def start(self) -> dict[str, bytearray | None]:
        return {
            name: None if size is None else bytearray(initial(self.seed, name, size))
            for name, size in self.files.items()
        }


def choose(
    spec: Spec, k: int, rnd: random.Random, files: dict[str, bytearray | None], open_ones: set[str]
) -> Op:
    """The writer's next operation."""
    name = rnd.choice(sorted(files))
    data = files[name]
    if data is None:
        return Op(k, "create", name)
    if name not in open_ones:
        return Op(k, "open", name)
    kind = rnd.choices([a for a, _ in ACTIONS], weights=[w for _, w in ACTIONS])[0]
    size = len(data)
    if kind == "write":
        length = rnd.choice(LENGTHS)
        where = rnd.random()
        if where < 0.45:
            offset = size
        elif where < 0.85:
            offset = rnd.randrange(0, size + 1)
        else:
            offset = size + rnd.randrange(1, 65_536)
        if offset + length <= spec.max_size:
            return Op(k, "write", name, offset, length)
        kind = "truncate"
        size = spec.max_size // 4
    if kind == "truncate":
        return Op(k, "truncate", name, min(spec.max_size, rnd.randrange(0, size + 2 * PAGE)))
    return Op(k, kind, name)


def run_writer(spec: Spec) -> int:
    """Write until the first error (see the module docstring); the exit code."""
    rnd = random.Random(f"writer/{spec.seed}")
    files = spec.start()
    fds: dict[str, int] = {}
    log = os.open(spec.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    k = 0
    rest: Op | None = None  # of a write answered short: written next (as writers do)
    while True:
        k += 1
        op = choose(spec, k, rnd, files, set(fds)) if rest is None else replace(rest, k=k)
        rest = None
        os.write(log, op.line().encode())
        path = os.path.join(spec.root, op.name)
        extra = ""
        done = 0
        try:
            if op.kind == "create":
                fds[op.name] = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            elif op.kind == "open":
                fds[op.name] = os.open(path, os.O_RDWR)
            elif op.kind == "write":
                done = os.pwrite(fds[op.name], op.data(spec.seed), op.a)
                if not done:
                    raise OSError(0, "a write stored nothing")
                if done < op.b:
                    rest = op.rest(done)
            elif op.kind == "truncate":
                os.ftruncate(fds[op.name], op.a)
            elif op.kind == "fsync":
                os.fsync(fds[op.name])
            else:
                os.close(fds.pop(op.name))
        except OSError as e:
            os.write(log, f"E {k} {e.errno}\n".encode())
            os.fsync(log)
            print(f"writer: operation {k} ({op.kind} {op.name}): {e}", file=sys.stderr)
            return 0
        files[op.name] = data = op.apply(spec.seed, files[op.name], done)
        if op.kind == "fsync":
            assert data is not None
            extra = f" {len(data)} {digest(data)}"
        os.write(log, f"A {k} {done}{extra}\n".encode())
        if op.kind == "fsync":
            os.fsync(log)


@dataclass
class History:
    """The writer's log, replayed (see the module docstring)."""

    spec: Spec
    #: Each file as the acknowledged operations left it (None: it does not exist).
    acked: dict[str, bytearray | None] = field(default_factory=dict)
    #: The operation under way when the writer stopped, if any.
    pending: Op | None = None
    #: The errno the writer stopped on.
    error: int | None = None
    acks: int = 0
    fsyncs: int = 0
    #: Replay disagreeing with the writer (a bug of this module).
    problems: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, spec: Spec) -> History:
        with open(spec.log) as f:
            text = f.read()
        history = cls(spec, spec.start())
        ops: dict[int, Op] = {}
        current: Op | None = None
        for line in text.splitlines():
            word, k, *rest = line.split()
            if word == "B":
                a, b, src, skip = map(int, rest[2:])
                current = ops[int(k)] = Op(int(k), rest[0], rest[1], a, b, src, skip)
            elif word == "A":
                op = ops[int(k)]
                data = op.apply(spec.seed, history.acked[op.name], int(rest[0]))
                history.acked[op.name] = data
                history.acks += 1
                current = None
                if op.kind == "fsync":
                    history.fsyncs += 1
                    assert data is not None
                    if rest[1:] != [str(len(data)), digest(data)]:
                        history.problems.append(f"replay of {op} disagrees with the writer")
            elif word == "E":
                history.error = int(rest[0])
        history.pending = current
        return history

    def after_pending(self, name: str) -> bytearray | None:
        """*name* as the pending operation would leave it, done in full."""
        data = self.acked[name]
        op = self.pending
        if op is None or op.name != name:
            return data
        copy = None if data is None else bytearray(data)
        return op.apply(self.spec.seed, copy, op.b)

    def explain(self, name: str, got: bytes | None) -> str | None:
        """None if the source's *got* (None: no such file) is a state the
        writer's acknowledged operations allow; otherwise what is wrong."""
        acked, after = self.acked[name], self.after_pending(name)
        if got in (acked, after):
            return None
        if got is None:
            assert acked is not None
            return f"{name}: lost: missing, {len(acked)} bytes acknowledged"
        if acked is None:
            return f"{name}: {len(got)} bytes, but no creation was acknowledged"
        op = self.pending
        if op is None or op.name != name or op.kind != "write" or after is None:
            return f"{name}: {self._differs(got, acked)} (pending: {op})"
        low, high = len(acked), max(len(acked), len(after))
        if not low <= len(got) <= high:
            return f"{name}: {len(got)} bytes, not between {low} and {high} (pending: {op})"
        cuts = {low, op.a, op.a + op.b}
        for page in range(0, len(got), PAGE):
            end = min(page + PAGE, len(got))
            edges = sorted({page, end} | {c for c in cuts if page < c < end})
            for start, stop in zip(edges, edges[1:], strict=False):
                piece = got[start:stop]
                if not (
                    (stop <= low and piece == acked[start:stop])
                    or piece == after[start:stop]
                    or (start >= low and not piece.strip(b"\0"))
                ):
                    return (
                        f"{name}: wrong bytes at {start}..{stop}: neither the acknowledged"
                        f" state ({low} bytes) nor {op} ({len(after)} bytes)"
                    )
        return None

    @staticmethod
    def _differs(got: bytes, want: bytes | bytearray) -> str:
        if len(got) != len(want):
            return f"{len(got)} bytes, {len(want)} acknowledged"
        first = next(i for i, (x, y) in enumerate(zip(got, want, strict=True)) if x != y)
        return f"wrong bytes from {first} (page {first // PAGE}) of {len(want)}"

    def existing(self) -> set[str]:
        """The files that may be in the source."""
        return {n for n in self.acked if self.after_pending(n) is not None}


def main() -> None:
    sys.exit(run_writer(Spec.loads(sys.argv[1])))


if __name__ == "__main__":
    main()
