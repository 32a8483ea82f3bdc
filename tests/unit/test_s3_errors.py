"""S3 errors as result codes: a misbehaving server, and the mapping table itself.

moto answers neither 5xx nor SlowDown nor half a response on demand, so a
stub HTTP server on 127.0.0.1 does; the mapping of the answers no server here
gives (a wrong region, an expired token, a DNS failure) is checked on the
text obstore raises, copied from real errors.
"""

from __future__ import annotations

import contextlib
import http.server
import select
import socket
import threading
from collections.abc import Iterator

import pytest
from obstore.exceptions import GenericError, PermissionDeniedError, PreconditionError

from backends.s3 import open_backend
from backends.s3errors import describe, os_error, result_for
from cachefs.contract import ReadData, RWEvent, RWResult

BODY = b"x" * 1000


class StubServer(http.server.ThreadingHTTPServer):
    """Answers every GET as ``mode`` says: "ok", "cut" (half a body) or a status."""

    daemon_threads = True
    mode = "ok"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Stub(http.server.BaseHTTPRequestHandler):
    server: StubServer

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        mode = self.server.mode
        if mode in ("503", "500", "429"):
            code = {"503": "SlowDown", "500": "InternalError", "429": "TooManyRequests"}
            body = f"<Error><Code>{code[mode]}</Code><Message>m</Message></Error>".encode()
            self.send_response(int(mode))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        first, last = map(int, self.headers["Range"].removeprefix("bytes=").split("-"))
        body = BODY[first : last + 1]
        self.send_response(206)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Range", f"bytes {first}-{first + len(body) - 1}/{len(BODY)}")
        self.send_header("ETag", '"e"')
        self.send_header("Last-Modified", "Sat, 21 Nov 2026 00:00:00 GMT")
        self.end_headers()
        self.wfile.write(body[:10] if mode == "cut" else body)
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stub() -> Iterator[StubServer]:
    server = StubServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


async def read(endpoint: str, **options: object) -> ReadData:
    backend = open_backend(
        "s3://stub-bucket", endpoint=endpoint, anonymous=True, check_timeout=None, **options
    )
    req = ReadData("f", len(BODY), 0, RWEvent.RANDOM_STARTED, memoryview(bytearray(100)), 100)
    await backend.read_data(req)
    return req


@pytest.mark.parametrize("mode", ["503", "500", "429", "cut"])
async def test_server_errors_and_broken_responses_are_failures(stub, mode: str) -> None:
    stub.mode = mode
    req = await read(stub.endpoint, retries=1)
    assert (req.result_code, req.bytes_read) == (RWResult.FAILURE, 0)
    stub.mode = "ok"
    req = await read(stub.endpoint, retries=1)
    assert (req.result_code, bytes(req.buffer)) == (RWResult.SUCCESS, BODY[:100])


async def test_a_server_that_never_answers_is_a_failure() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel accepts connections; nobody answers
        req = await read(f"http://127.0.0.1:{silent.getsockname()[1]}", retries=0, timeout=0.5)
    assert req.result_code is RWResult.FAILURE


# Which connection the kernel drops depends on how fast it completes the
# others: run alone, not beside another worker's load (.ci/test).
@pytest.mark.serial
async def test_an_endpoint_that_takes_no_connection_is_unreachable() -> None:
    with socket.socket() as full, contextlib.ExitStack() as stack:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        # Connect until one connection hangs: the backlog is then full and the
        # kernel drops every further SYN (one CI run saw the first connection
        # fail and the backend's connection get the free slot).
        for _ in range(8):
            waiting = stack.enter_context(socket.socket())
            waiting.setblocking(False)
            waiting.connect_ex(full.getsockname())
            if not select.select([], [waiting], [], 0.5)[1]:
                break
        else:
            pytest.fail("the kernel kept accepting connections past a backlog of 0")
        endpoint = f"http://127.0.0.1:{full.getsockname()[1]}"
        req = await read(endpoint, retries=0, connect_timeout=0.5, timeout=5)
    assert req.result_code is RWResult.PERMANENT_FAILURE


def obstore_error(status: int, code: str, cls: type[Exception] = GenericError) -> Exception:
    return cls(
        "Generic S3 error: Error performing GET https://s3.eu-west-1.amazonaws.com/b/k in 20ms"
        f" - Server returned non-2xx status code: {status} X: <?xml version='1.0'?>\n"
        f"<Error><Code>{code}</Code><Message>says {code}</Message></Error>\n\n"
        'Debug source:\nGeneric { store: "S3", source: RetryError(...) }'
    )


NETWORK = (
    "Generic S3 error: Error performing GET http://h:9000/b/k in 5ms, after 3 retries, "
    "max_retries: 3, retry_timeout: 30s  - HTTP error: error sending request\n\n"
    "Debug source:\nGeneric {{ inner: Http(HttpError {{ kind: {kind}, source: {source} }}) }}"
)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (obstore_error(412, "PreconditionFailed", PreconditionError), "FILE_MODIFIED_EXTERNALLY"),
        (obstore_error(404, "NoSuchKey", FileNotFoundError), "FILE_MODIFIED_EXTERNALLY"),
        (obstore_error(416, "InvalidRange"), "RANGE_BEYOND_EOF"),
        (obstore_error(404, "NoSuchBucket", FileNotFoundError), "PERMANENT_FAILURE"),
        (obstore_error(403, "InvalidAccessKeyId", PermissionDeniedError), "PERMANENT_FAILURE"),
        (obstore_error(403, "SignatureDoesNotMatch"), "PERMANENT_FAILURE"),
        (obstore_error(400, "ExpiredToken"), "PERMANENT_FAILURE"),
        (obstore_error(301, "PermanentRedirect"), "PERMANENT_FAILURE"),
        (obstore_error(400, "AuthorizationHeaderMalformed"), "PERMANENT_FAILURE"),
        (obstore_error(403, "AccessDenied", PermissionDeniedError), "FILE_FAILURE"),
        (obstore_error(403, "InvalidObjectState"), "FILE_FAILURE"),
        (obstore_error(503, "SlowDown"), "FAILURE"),
        (obstore_error(500, "InternalError"), "FAILURE"),
        (obstore_error(400, "RequestTimeout"), "FAILURE"),
        (GenericError(NETWORK.format(kind="Timeout", source="TimedOut")), "FAILURE"),
        (GenericError(NETWORK.format(kind="Request", source="IncompleteMessage")), "FAILURE"),
        (
            GenericError(NETWORK.format(kind="Connect", source='message: "Connection refused"')),
            "PERMANENT_FAILURE",
        ),
        (GenericError(NETWORK.format(kind="Connect", source="dns error")), "PERMANENT_FAILURE"),
        (
            GenericError(NETWORK.format(kind="Timeout", source="ConnectError(TimedOut)")),
            "PERMANENT_FAILURE",
        ),
    ],
)
def test_the_mapping_table(error: Exception, expected: str) -> None:
    rc, reason = result_for(error)
    assert rc.name == expected
    assert "\n" not in reason and reason == describe(error)


def test_a_403_on_a_stat_or_listing_lets_the_cache_serve_what_it_has() -> None:
    """The engine answers a PermissionError with EACCES and serves nothing
    stale (a local file's mode); a 403 from S3 may be credentials that expire:
    the cache keeps serving its cached version (docs/s3.md: What each S3 answer does)."""
    e = os_error(obstore_error(403, "AccessDenied", PermissionDeniedError), "HEAD f")
    assert type(e) is OSError and "AccessDenied" in str(e)
