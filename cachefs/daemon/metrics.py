"""The Prometheus endpoint of a mount: ``cachefs mount --metrics HOST:PORT``.

Policy:

* What is exported is what ``cachefs stats`` shows (ControlCommands.stats),
  as counters (``cachefs_..._total``) and gauges, plus the latency
  histograms of ReadData calls and of FUSE requests by operation.
  docs/metrics.md lists every name.
* Each scrape takes one snapshot of the mount on the daemon's trio loop,
  where the engine's counters change: never from another thread, so a
  scrape never sees half an update.  The text is made by prometheus_client
  (a collector of this snapshot, in a registry of its own).
* The server is the smallest HTTP/1.1 that Prometheus needs: ``GET
  /metrics`` answers 200 with the exposition, any other path 404, any
  other method 405, then the connection is closed.  A request head larger
  than MAX_REQUEST gets 431; a client gets REQUEST_DEADLINE seconds for
  the whole exchange; at most MAX_CONNECTIONS are served at once, and those
  beyond are closed at once.  A slow client holds only its own connection.
* An address the daemon cannot listen on fails the mount with one line
  (ConfigError, exit 2), before anything is mounted.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from cachefs.control.protocol import StatsReply
from cachefs.errors import ConfigError
from cachefs.latency import HistogramData, Latencies

log = logging.getLogger(__name__)

#: Connections served at once; Prometheus makes one per scrape.
MAX_CONNECTIONS = 8
#: The largest request head read (a scrape's is a few hundred bytes).
MAX_REQUEST = 8192
#: What is read of a refused request's rest before the connection is closed.
DRAIN_LIMIT = 1 << 20
#: How long one connection may take, from accept to the answer sent.
REQUEST_DEADLINE = 10.0

#: Counters of ``cachefs stats``, by its key: name, help.
COUNTERS = {
    "hit_bytes": ("cachefs_hit_bytes_total", "Bytes read that the cache held"),
    "miss_bytes": ("cachefs_miss_bytes_total", "Bytes read that the cache did not hold"),
    "bytes_from_backend": (
        "cachefs_backend_read_bytes_total",
        "Bytes ReadData calls brought from the backend",
    ),
    "evicted_bytes": ("cachefs_evicted_bytes_total", "Bytes evicted to stay under the limit"),
    "passthrough_opens": (
        "cachefs_passthrough_opens_total",
        "Opens handed to the kernel to read from the cache file by itself",
    ),
    "stale_served": (
        "cachefs_stale_served_total",
        "Reads served what was last known while the source failed or was offline",
    ),
    "version_gone_reads": (
        "cachefs_version_gone_reads_total",
        "Reads that failed (ESTALE) because their version could not be completed",
    ),
    "fetched_ahead": (
        "cachefs_fetched_ahead_files_total",
        "Files fetched whole ahead of a reader walking their directory",
    ),
    "cache_disk_failures": (
        "cachefs_cache_disk_failures_total",
        "Failures of the cache directory's filesystem",
    ),
    "flushed_files": ("cachefs_flushed_files_total", "Changed files flushed to the source"),
    "flushed_bytes": ("cachefs_flushed_bytes_total", "Bytes flushed to the source"),
    "write_data_calls": ("cachefs_write_data_calls_total", "WriteData calls made"),
    "write_failures": ("cachefs_write_failures_total", "Flushes that did not reach the source"),
    "write_conflicts": (
        "cachefs_write_conflicts_total",
        "Flushes that found the file changed at the source (both versions kept)",
    ),
}

#: Gauges of ``cachefs stats``, by its key: name, help.
GAUGES = {
    "cached_bytes": ("cachefs_cached_bytes", "Bytes of file data the cache holds"),
    "cache_limit": ("cachefs_cache_limit_bytes", "The cache's size limit"),
    "min_free": ("cachefs_min_free_bytes", "Space kept free on the cache's filesystem"),
    "pinned_bytes": ("cachefs_pinned_bytes", "Bytes of pinned files"),
    "pinned_files": ("cachefs_pinned_files", "Pinned files"),
    "files_in_error": (
        "cachefs_files_in_error",
        "Files latched by a failed read or a refused flush (cachefs reset-file-errors)",
    ),
    "passthrough_files": (
        "cachefs_passthrough_files",
        "Files open for the kernel to read by itself",
    ),
    "unhashed_blocks": ("cachefs_unhashed_blocks", "Blocks fetched and not yet hashed"),
    "inodes": ("cachefs_inodes", "Inodes the kernel knows"),
    "dirty_files": ("cachefs_dirty_files", "Files changed and not yet flushed"),
    "dirty_bytes": ("cachefs_dirty_bytes", "Bytes changed and not yet flushed"),
    "flushing_files": ("cachefs_flushing_files", "Files being flushed"),
    "max_dirty": ("cachefs_max_dirty_bytes", "The limit of changed bytes not yet flushed"),
}

#: Gauges of 1 while ``cachefs stats`` shows the key set (a reason, or true), else 0.
FLAGS = {
    "external_error": (
        "cachefs_external_error",
        "1 while the storage is latched after PERMANENT_FAILURE (cachefs reset-external-error)",
    ),
    "cache_disk_error": (
        "cachefs_cache_disk_error",
        "1 while the cache disk is failing and reads go to the source uncached",
    ),
    "read_only": ("cachefs_read_only", "1 if the mount takes no changes"),
}

#: Counters of the ``group`` object of ``cachefs stats``, by its key: name, help.
GROUP_COUNTERS = {
    "hosted_hits": ("cachefs_hosted_hits_total", "Blocks read from the hosted cache"),
    "hosted_bytes": ("cachefs_hosted_bytes_total", "Bytes read from the hosted cache"),
    "hosted_misses": (
        "cachefs_hosted_misses_total",
        "Blocks asked of the hosted cache that it did not have",
    ),
    "hosted_errors": (
        "cachefs_hosted_errors_total",
        "Requests to the hosted cache that failed or passed their deadline",
    ),
    "rejected_blocks": (
        "cachefs_hosted_rejected_blocks_total",
        "Blocks from the hosted cache with other bytes than their name says",
    ),
    "offered": ("cachefs_hosted_offered_blocks_total", "Blocks offered to the hosted cache"),
    "uploaded": ("cachefs_hosted_uploaded_blocks_total", "Blocks uploaded to the hosted cache"),
    "already_there": (
        "cachefs_hosted_already_there_blocks_total",
        "Offers skipped: the block was in the hosted cache already",
    ),
    "dropped_offers": (
        "cachefs_hosted_dropped_offers_total",
        "Offers dropped: queue full, hosted cache down, or upload failed",
    ),
    "mismatched_offers": (
        "cachefs_hosted_mismatched_offers_total",
        "Offered blocks that did not match their content information",
    ),
    "content_published": (
        "cachefs_group_content_published_total",
        "Content records this mount published",
    ),
    "content_used": (
        "cachefs_group_content_used_total",
        "Lookups answered by a trusted content record",
    ),
    "rejected_records": ("cachefs_group_rejected_records_total", "Group records not used"),
    "versions_published": (
        "cachefs_group_versions_published_total",
        "Version records this mount published",
    ),
    "versions_applied": (
        "cachefs_group_versions_applied_total",
        "Files asked again after another member's version record",
    ),
}


class _Snapshot(Collector):
    """The metrics of one ``cachefs stats`` answer and of the FUSE timer."""

    def __init__(self, stats: StatsReply, fuse: Latencies | None) -> None:
        self._stats = stats
        self._fuse = fuse

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        yield from _plain(stats, COUNTERS, CounterMetricFamily)
        yield from _plain(stats, GAUGES, GaugeMetricFamily)
        for key, (name, text) in FLAGS.items():
            yield GaugeMetricFamily(name, text, value=1 if stats.get(key) else 0)
        calls = CounterMetricFamily(
            "cachefs_read_data_calls_total",
            "ReadData calls answered, by result code (FAILURE too for a backend that raised)",
            labels=["code"],
        )
        for code, n in stats["read_data_results"].items():
            calls.add_metric([code], n)
        yield calls
        corrupt = CounterMetricFamily(
            "cachefs_verification_failures_total",
            "Blocks that did not match their hash: from the backend, or read back from the cache",
            labels=["where"],
        )
        corrupt.add_metric(["backend"], stats["corrupt_from_backend"])
        corrupt.add_metric(["cache"], stats["corrupt_in_cache"])
        yield corrupt
        added = CounterMetricFamily(
            "cachefs_add_data_blocks_total",
            "Blocks supplied with add-data, accepted or rejected",
            labels=["result"],
        )
        added.add_metric(["accepted"], stats["add_data_accepted"])
        added.add_metric(["rejected"], stats["add_data_rejected"])
        yield added
        yield _histogram(
            "cachefs_read_data_duration_seconds",
            "How long ReadData calls took to answer",
            [([], stats["read_data_seconds"])],
        )
        if self._fuse is not None:
            yield _histogram(
                "cachefs_fuse_request_duration_seconds",
                "How long FUSE requests took in cachefs: native, from the request read to "
                "its answer written; pyfuse3, the handler's run",
                [([op], h.data()) for op, h in self._fuse],
                labels=["op"],
            )
        group = stats.get("group")
        if group is not None:
            yield from _group(group)


def _plain(
    stats: dict[str, Any],
    table: dict[str, tuple[str, str]],
    kind: type[CounterMetricFamily] | type[GaugeMetricFamily],
) -> Iterator[Metric]:
    for key, (name, text) in table.items():
        if key in stats:
            yield kind(name, text, value=stats[key])


def _group(group: dict[str, Any]) -> Iterator[Metric]:
    yield from _plain(group, GROUP_COUNTERS, CounterMetricFamily)
    yield GaugeMetricFamily(
        "cachefs_hosted_offer_queue_bytes",
        "Bytes waiting to be uploaded to the hosted cache",
        value=group["offer_queue_bytes"],
    )
    if group["hosted_cache"] is not None:
        yield GaugeMetricFamily(
            "cachefs_hosted_down",
            "1 while the hosted cache is taken for down (reads go to the origin)",
            value=1 if group["hosted_down"] else 0,
        )
    yield GaugeMetricFamily(
        "cachefs_group_pins",
        "Files the group's pin records pin here",
        value=len(group["group_pins"]),
    )


def _histogram(
    name: str,
    text: str,
    series: Iterable[tuple[list[str], HistogramData]],
    labels: list[str] | None = None,
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, text, labels=labels)
    for values, data in series:
        buckets, total = [], 0
        for bound, n in zip([*data["bounds"], float("inf")], data["counts"], strict=True):
            total += n
            buckets.append((floatToGoString(bound), total))
        family.add_metric(values, buckets, data["sum"])
    return family


def exposition(stats: StatsReply, fuse: Latencies | None) -> bytes:
    """The text Prometheus reads: *stats* (a ``cachefs stats`` answer) and *fuse*."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(stats, fuse))
    return generate_latest(registry)


def show(address: tuple[str, int]) -> str:
    """HOST:PORT as typed (an IPv6 host in brackets)."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Refused(Exception):
    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


class MetricsServer:
    """Answers scrapes with a snapshot of *stats* (ControlCommands.stats) and *fuse*."""

    def __init__(
        self, stats: Callable[[], Awaitable[StatsReply]], fuse: Latencies | None = None
    ) -> None:
        self._stats = stats
        self._fuse = fuse
        self._connections = 0

    async def serve(
        self,
        address: tuple[str, int],
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on *address*, report the listeners, serve until cancelled.

        ConfigError (one line) if the address cannot be listened on: in use,
        not of this machine, or a name that does not resolve.
        """
        host, port = address
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as e:
            reason = e.strerror or str(e)
            raise ConfigError(f"--metrics {show(address)}: cannot listen: {reason}") from None
        log.info("metrics at http://%s/metrics", show(address))
        task_status.started(listeners)
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            if self._connections >= MAX_CONNECTIONS:
                log.debug("metrics: %d connections already, one closed", MAX_CONNECTIONS)
                return
            self._connections += 1
            try:
                with trio.move_on_after(REQUEST_DEADLINE):
                    await self._exchange(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client left
            except Exception:  # a scrape must not take the mount down
                log.exception("metrics: answering a scrape failed")
            finally:
                self._connections -= 1

    async def _exchange(self, stream: trio.SocketStream) -> None:
        try:
            method, path = await _request_line(stream)
            if method not in ("GET", "HEAD"):
                raise _Refused("405 Method Not Allowed")
            if path.partition("?")[0] != "/metrics":
                raise _Refused("404 Not Found")
        except _Refused as refused:
            text = f"{refused.status}\n".encode()
            await stream.send_all(_response(refused.status, "text/plain", text))
            await _drain(stream)
            return
        except EOFError:
            return
        body = exposition(await self._stats(), self._fuse)
        await stream.send_all(
            _response("200 OK", CONTENT_TYPE_PLAIN_0_0_4, body, with_body=method == "GET")
        )
        await _drain(stream)


async def _request_line(stream: trio.SocketStream) -> tuple[str, str]:
    """The method and path of the request on *stream*, once its head is read.

    _Refused (400, 431) for a head that is not HTTP or too large; EOFError if
    the client closed before the end of the head."""
    head = bytearray()
    while b"\r\n\r\n" not in head and b"\n\n" not in head:
        if len(head) > MAX_REQUEST:
            raise _Refused("431 Request Header Fields Too Large")
        chunk = await stream.receive_some(MAX_REQUEST)
        if not chunk:
            raise EOFError
        head += chunk
    words = head.split(b"\n", 1)[0].split()
    if len(words) != 3 or not words[2].startswith(b"HTTP/"):
        raise _Refused("400 Bad Request")
    return words[0].decode("ascii", "replace"), words[1].decode("ascii", "replace")


async def _drain(stream: trio.SocketStream) -> None:
    """Read what the client still sends (a request left unread), up to
    DRAIN_LIMIT bytes: closing with it unread would reset the connection,
    and the client might lose the answer."""
    await stream.send_eof()
    drained = 0
    while drained < DRAIN_LIMIT and (chunk := await stream.receive_some(MAX_REQUEST)):
        drained += len(chunk)


def _response(status: str, content_type: str, body: bytes, with_body: bool = True) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + (body if with_body else b"")
