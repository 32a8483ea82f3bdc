"""A real redis-server for the tests: /usr/bin/redis-server on 127.0.0.1, a free port.

The ``redis_server`` fixture starts one for the test (registered for
tests/records/ by its conftest.py) and always stops it at the end.  A test
may break it on purpose: ``kill()`` (kill -9: connections break, data not
persisted is gone), ``stop()`` then ``start()`` (same port and directory;
with ``appendonly=True`` the data survives a restart, even after ``kill()``),
``pause()``/``resume()`` (SIGSTOP/SIGCONT: connections stay open and nothing
answers, a hung server).  ``password="..."`` makes it require one (``url``
carries it); ``tls=True`` makes it speak TLS only, with a self-signed
certificate for 127.0.0.1 that ``url`` (rediss://) trusts.  ``client()`` is a
coredis client for a test that pokes at the engine by hand
(``async with server.client() as c: ...``).
"""

from __future__ import annotations

import datetime
import ipaddress
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import coredis
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

REDIS = Path("/usr/bin/redis-server")
START_DEADLINE = 20.0
STOP_DEADLINE = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server subprocess; ``start`` returns once it answers PING."""

    def __init__(
        self,
        directory: Path,
        *,
        appendonly: bool = False,
        password: str | None = None,
        tls: bool = False,
    ) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = directory / "redis.log"
        self.port = free_port()
        self.appendonly = appendonly
        self.password = password
        self.tls = tls
        auth = f":{quote(password, safe='')}@" if password else ""
        scheme, query = "redis", ""
        if tls:
            self.cert, self.key = self_signed_cert(directory)
            scheme, query = "rediss", f"?ssl_ca_certs={self.cert}"
        self.url = f"{scheme}://{auth}127.0.0.1:{self.port}/0{query}"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        assert not self.running, "redis-server is running already"
        args = [str(REDIS), "--bind", "127.0.0.1"]
        if self.tls:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            args += ["--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key)]
        else:
            args += ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password]
        args += ["--dir", str(self.dir), "--logfile", str(self.log_path), "--save", ""]
        args += ["--appendonly", "yes" if self.appendonly else "no", "--daemonize", "no"]
        self._proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + START_DEADLINE
        while not self._answers_ping():
            if self._proc.poll() is not None:
                pytest.fail(f"redis-server exited with {self._proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"redis-server not ready after {START_DEADLINE} s:\n{self.log_tail()}")
            time.sleep(0.02)

    def _answers_ping(self) -> bool:
        """PONG, or an error asking for a password: not -LOADING, not silence."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw:
                s = raw
                if self.tls:
                    context = ssl.create_default_context(cafile=self.cert)
                    s = context.wrap_socket(raw, server_hostname="127.0.0.1")
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except FileNotFoundError:
            return "(no log)"

    def kill(self) -> None:
        """kill -9: connections break, nothing answers on the port any more."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=STOP_DEADLINE)

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a hung server)."""
        assert self._proc is not None and self._proc.poll() is None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM (SIGKILL if it does not exit in time)."""
        if self._proc is not None and self._proc.poll() is None:
            self.resume()  # a stopped process would not act on SIGTERM
            self._proc.terminate()
            try:
                self._proc.wait(timeout=STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self) -> coredis.Redis[Any]:
        """A coredis client (bytes replies) to use as ``async with server.client() as c``."""
        return coredis.Redis.from_url(self.url, decode_responses=False)


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files in *directory*."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cachefs test redis")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "redis.crt", directory / "redis.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture
def redis_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, without persistence unless the test asks
    (``@pytest.mark.parametrize("redis_server", [{"appendonly": True}], indirect=True)``,
    or ``{"tls": True}``, ``{"password": "..."}``); gone when the test ends."""
    options = getattr(request, "param", {})
    server = RedisServer(tmp_path / "redis", **options)
    server.start()
    try:
        yield server
    finally:
        server.stop()
