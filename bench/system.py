"""The machine under the benchmark: tools, facts, kernel caches, daemon accounting."""

from __future__ import annotations

import argparse
import mmap
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

# tool -> how to get it
TOOLS = {
    "fio": "apt-get install fio",
    "rclone": "apt-get install rclone",
    "fusermount3": "apt-get install fuse3",
    "ls": "coreutils",
    "cat": "coreutils",
}


class BenchError(Exception):
    """Something the user can fix; printed as one line."""


def missing_tools(targets: list[str]) -> list[str]:
    """What this run needs and cannot find, as ``name (how to get it)``."""
    need = dict(TOOLS)
    if not any(t.startswith("rclone") for t in targets):
        need.pop("rclone")
    missing = [f"{tool} ({how})" for tool, how in need.items() if shutil.which(tool) is None]
    if not os.path.exists("/dev/fuse"):
        missing.append("/dev/fuse (apt-get install fuse3, or --device /dev/fuse)")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        missing.append("matplotlib (pip install -e '.[bench]')")
    if "cachefs-pyfuse3" in targets:
        try:
            import pyfuse3  # noqa: F401
        except ImportError:
            missing.append("pyfuse3 (pip install -e '.[pyfuse3]')")
    return missing


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _first(text: str, key: str) -> str:
    for line in text.splitlines():
        if line.startswith(key):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _run(*cmd: str) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip()


def _disk(path: Path) -> str:
    """The device, file system and model under *path*, as well as we can tell."""
    line = _run("findmnt", "-n", "-o", "SOURCE,FSTYPE", "-T", str(path)).split()
    if len(line) < 2:
        return "unknown"
    source, fstype = line[0], line[1]
    device = _run("lsblk", "-n", "-d", "-o", "PKNAME", source) or Path(source).name
    pairs = _run("lsblk", "-n", "-d", "-P", "-o", "NAME,MODEL,SIZE,ROTA,TRAN", f"/dev/{device}")
    info = dict(re.findall(r'(\w+)="([^"]*)"', pairs))
    if not info:
        return f"{source} ({fstype})"
    kind = "rotational" if info.get("ROTA") == "1" else "non-rotational"
    driver = Path(f"/sys/block/{device}/device/driver")
    model = info.get("MODEL") or info.get("TRAN") or (driver.exists() and driver.resolve().name)
    return f"{source} ({fstype}), {info.get('SIZE', '?')}, {model or '?'}, {kind} per the kernel"


def machine(workdir: Path) -> dict[str, Any]:
    """CPU, cores, memory, kernel, disk and tool versions, for the report."""
    cpuinfo = _read("/proc/cpuinfo")
    mem_kb = int(_first(_read("/proc/meminfo"), "MemTotal").split()[0] or 0)
    return {
        "cpu": _first(cpuinfo, "model name"),
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / (1 << 20), 1),
        "kernel": platform.release(),
        "disk": _disk(workdir),
        "python": platform.python_version(),
        "fio": _run("fio", "--version"),
        "rclone": (_run("rclone", "version").splitlines() or ["missing"])[0],
        "fuse": _run("fusermount3", "--version"),
    }


def can_drop_caches() -> bool:
    return os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)


# virtio-balloon's device id, and its feature bit VIRTIO_BALLOON_F_REPORTING
_BALLOON, _FREE_PAGE_REPORTING = "0x0005", 5
_MADV_POPULATE_WRITE = 23  # Linux 5.14


class _Retouch:
    factor = 0  # set once by set_memory_retouch


def host_takes_free_memory() -> bool:
    """Whether this is a VM that hands memory freed in it back to its host
    (virtio-balloon free page reporting)."""
    for dev in Path("/sys/bus/virtio/devices").glob("*"):
        try:
            if (dev / "device").read_text().strip() != _BALLOON:
                continue
            bits = (dev / "features").read_text().strip()
        except OSError:
            continue
        if len(bits) > _FREE_PAGE_REPORTING and bits[_FREE_PAGE_REPORTING] == "1":
            return True
    return False


def set_memory_retouch(factor: int) -> None:
    """After each drop of the caches, touch *factor* times the bytes the next
    measurement reads, once, and free that memory again.

    On a VM with free page reporting, the memory a drop frees is handed back
    to the host within seconds, and the first write to each page of it
    afterwards stops for the host to find a page again: about 1 s of CPU per
    GiB here, counted as the copy into a fresh page cache page.  Raw reads
    fill the page cache by DMA, which the host's I/O thread pays for; a FUSE
    mount's page cache (and its daemon's cache) are filled by the CPU, so
    without this their cold and cache-hit figures measured the host, and
    swung 2x from one run to the next.  Touching the memory makes the host
    back it again, as a machine in use has it.  The factor was measured
    when a read through cachefs filled twice its bytes of page cache (the
    mount's pages and the cache's or the source's; large cold reads now go
    O_DIRECT and fill only the mount's), and the host takes back part of
    the touched memory before the read gets to it: 2 GiB touched for a 1 GiB
    read still left cache-hit reads at half speed in one run of two, 3 and
    4 GiB did not (A/B of cachefs cache-hit reads in the same minutes, 2-3
    runs each).
    """
    _Retouch.factor = factor


def touch_memory(nbytes: int) -> None:
    """Write one byte in every page of *nbytes* of fresh memory, then free it."""
    if nbytes <= 0:
        return
    m = mmap.mmap(-1, nbytes, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        try:
            m.madvise(_MADV_POPULATE_WRITE)
        except OSError:  # before 5.14
            for offset in range(0, nbytes, mmap.PAGESIZE):
                m[offset] = 1
    finally:
        m.close()


def drop_caches(enabled: bool = True, reads: int = 0) -> None:
    """Write back and drop the page, dentry and inode caches (root only);
    then touch memory for a measurement that *reads* bytes (see
    set_memory_retouch), at most half of what is available."""
    os.sync()
    if enabled:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        touch_memory(min(_Retouch.factor * reads, _available_memory() // 2))


def _available_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# -- mounts ----------------------------------------------------------------------------


def is_mounted(path: Path) -> bool:
    target = os.fsencode(os.path.realpath(path))
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4].replace(b"\\040", b" ") == target:
                return True
    return False


def lazy_unmount(path: Path) -> None:
    """The last resort: detach whatever is mounted on *path*."""
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, check=False)


def wait_mounted(path: Path, proc: subprocess.Popen[bytes], log: Path, deadline: float) -> None:
    """Return once *path* is mounted; BenchError if *proc* died or time ran out."""
    end = time.monotonic() + deadline
    while not is_mounted(path):
        if proc.poll() is not None:
            raise BenchError(f"{proc.args[0]} exited with {proc.returncode}; see {log}")
        if time.monotonic() > end:
            raise BenchError(f"{path} not mounted after {deadline:g} s; see {log}")
        time.sleep(0.05)


@contextmanager
def serve_on(cmd: list[str], port: int, log: Path, deadline: float) -> Iterator[None]:
    """Run the server *cmd* while within, once it listens on 127.0.0.1:*port*;
    always stopped on the way out."""
    name = Path(cmd[0]).name
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        end = time.monotonic() + deadline
        while True:
            if proc.poll() is not None:
                raise BenchError(f"{name} exited with {proc.returncode}; see {log}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > end:
                    raise BenchError(f"{name} not listening after {deadline:g} s") from None
                time.sleep(0.05)
        yield
    finally:
        stop_process(proc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM, then SIGKILL; always reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def python_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def cachefs_cmd(*args: str) -> list[str]:
    return python_cmd("cachefs", *args)


# -- daemon accounting ------------------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


def _status_kb(pid: int, key: str) -> int:
    value = _first(_read(f"/proc/{pid}/status"), key)
    return int(value.split()[0]) if value != "unknown" else 0


@dataclass
class DaemonWatch:
    """CPU time and peak RSS of a daemon over one measured run.

    The peak is reset at the start (``clear_refs`` 5, root); where that fails
    the figure is the peak since the daemon started, which is said so.
    """

    pid: int | None
    _cpu: float = 0.0
    _reset: bool = False

    def start(self) -> None:
        if self.pid is None:
            return
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5\n")
            self._reset = True
        except OSError:
            self._reset = False
        self._cpu = _cpu_seconds(self.pid)

    def stop(self) -> dict[str, Any]:
        if self.pid is None:
            return {}
        return {
            "daemon_cpu_s": round(_cpu_seconds(self.pid) - self._cpu, 3),
            "daemon_peak_rss_mib": round(_status_kb(self.pid, "VmHWM") / 1024, 1),
            "daemon_rss_mib": round(_status_kb(self.pid, "VmRSS") / 1024, 1),
            "peak_is_per_run": self._reset,
        }


#: The most rounds a bench measures each job (``--rounds``).
MAX_ROUNDS = 9


def rounds_arg(text: str) -> int:
    """``--rounds N``: a whole number from 1 to MAX_ROUNDS."""
    n = int(text) if text.isdigit() else 0
    if not 1 <= n <= MAX_ROUNDS:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to {MAX_ROUNDS}")
    return n


def choose(text: str, known: list[str], what: str) -> list[str]:
    """A comma-separated choice among *known* (``--targets``, ``--jobs``)."""
    chosen = [t for t in text.split(",") if t]
    unknown = [t for t in chosen if t not in known]
    if unknown or not chosen:
        raise BenchError(f"unknown {what} {','.join(unknown)}: choose from {','.join(known)}")
    return chosen


def run_main(
    prog: str,
    main: Callable[[argparse.Namespace, Callable[[str], None], float], int],
    args: argparse.Namespace,
) -> int:
    """Run a bench command's *main* with a progress line printer timed from
    its start; a BenchError is one line and exit 2, and SIGTERM unwinds like
    Ctrl-C (every mount is unmounted on the way out), exit 130."""
    t0 = time.monotonic()
    signal.signal(signal.SIGTERM, _interrupt)

    def say(message: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {message}", flush=True)

    try:
        return main(args, say, t0)
    except BenchError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (mounts were unmounted)", file=sys.stderr)
        return 130


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
