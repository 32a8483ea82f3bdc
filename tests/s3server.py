"""A real S3 HTTP server for the tests: ``moto_server`` on 127.0.0.1, a free port.

Load the fixtures with ``pytest_plugins = ["s3server"]`` (and do not import
this module in a test module: it is then registered already imported, and
its asserts are not rewritten):

- ``s3_server`` (session): one server for the whole run; each test makes its
  own buckets.  While it runs, the environment holds test credentials only
  (no profile, no ~/.aws, no instance metadata), so S3 backends opened
  without options talk to it as any AWS client would.
- ``own_s3_server``: a server of the test's own, which it may kill and restart
  (moto keeps its state in memory: a restarted server is empty).
- ``make_source``: parametrised over enginerig.SOURCE_KINDS; each
  ``make_source(files)`` is a new source of that kind holding *files*.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import pytest
import trio
from enginerig import SOURCE_KINDS, LocalSource, MemorySource, Source, SourceFactory

from backends.s3 import S3Backend, open_backend

MOTO = Path(sys.executable).with_name("moto_server")
START_DEADLINE = 30.0
# Keys a listing page holds (S3 and moto: 1000): small, so that tests see pages.
PAGE = 100
TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
}
_buckets = itertools.count(1)
_users = itertools.count(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """One ``moto_server`` subprocess; ``start`` waits until it accepts connections."""

    def __init__(self, log_path: Path, port: int | None = None) -> None:
        self.log_path = log_path
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._admin: Any = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [str(MOTO), "-H", "127.0.0.1", "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "MOTO_S3_DEFAULT_MAX_KEYS": str(PAGE)},
            )
        deadline = time.monotonic() + START_DEADLINE
        while True:
            if self._proc.poll() is not None:
                pytest.fail(f"moto_server exited with {self._proc.returncode}: {self._log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"moto_server not listening after {START_DEADLINE} s")
                time.sleep(0.02)

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:]

    def kill(self) -> None:
        """SIGKILL: connections break, nothing answers on the port any more."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a hung server)."""
        assert self._proc is not None and self._proc.poll() is None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self.resume()  # a stopped process would not act on SIGTERM
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    # -- administration, as the bucket's owner -----------------------------

    def client(self, service: str = "s3") -> Any:
        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    @property
    def admin(self) -> Any:
        if self._admin is None:
            self._admin = self.client()
        return self._admin

    def new_bucket(self, files: dict[str, bytes] | None = None) -> str:
        bucket = f"test-bucket-{next(_buckets)}"
        self.admin.create_bucket(Bucket=bucket)
        for key, data in (files or {}).items():
            self.put(bucket, key, data)
        return bucket

    def put(self, bucket: str, key: str, data: bytes) -> str:
        """Create or replace an object; returns its ETag."""
        return self.admin.put_object(Bucket=bucket, Key=key, Body=data)["ETag"]

    def delete(self, bucket: str, key: str) -> None:
        self.admin.delete_object(Bucket=bucket, Key=key)

    def open(self, bucket_or_url: str, **options: Any) -> S3Backend:
        """The S3 backend on this server, quick to give up (tests kill servers)."""
        url = bucket_or_url if "://" in bucket_or_url else f"s3://{bucket_or_url}"
        options = {"endpoint": self.endpoint, "retries": 1, "timeout": 10.0, **options}
        return open_backend(url, **options)

    def source(self, files: dict[str, bytes] | None = None, **options: Any) -> S3Source:
        """A new bucket holding *files*, and the backend on it."""
        return S3Source(self, files or {}, **options)

    def user(self, statements: list[dict[str, Any]]) -> dict[str, str]:
        """A new IAM user with an inline policy; its access key, as env variables."""
        iam = self.client("iam")
        name = f"user-{next(_users)}"
        iam.create_user(UserName=name)
        policy = {"Version": "2012-10-17", "Statement": statements}
        iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return {
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
        }

    @contextmanager
    def iam_enforced(self) -> Iterator[None]:
        """Within: every request is checked against IAM (keys, signature, policy)."""
        self._reset_auth("0")
        try:
            yield
        finally:
            self._reset_auth("inf")

    def _reset_auth(self, count: str) -> None:
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth",
            data=count.encode(),
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200


class S3Source:
    """A bucket of its own on *server*, for the engine rig (see enginerig.Source)."""

    def __init__(self, server: MotoServer, files: dict[str, bytes], **options: Any) -> None:
        self.server = server
        self.bucket = server.new_bucket(files)
        self.backend = server.open(self.bucket, **options)

    def put(self, path: str, data: bytes) -> None:
        self.server.put(self.bucket, path, data)

    def delete(self, path: str) -> None:
        self.server.delete(self.bucket, path)

    def close(self) -> None:
        trio.run(self.backend.aclose)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    with pytest.MonkeyPatch.context() as env:
        for name in list(os.environ):
            if name.startswith("AWS_"):
                env.delenv(name)
        for name, value in TEST_ENV.items():
            env.setenv(name, value)
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def own_s3_server(s3_server: MotoServer, tmp_path: Path) -> Iterator[MotoServer]:
    """Depends on s3_server for its environment."""
    server = MotoServer(tmp_path / "moto.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=SOURCE_KINDS)
def make_source(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SourceFactory]:
    """``make_source(files)``: a new source of the parametrised kind holding *files*.

    Each call makes a fresh one (a new directory, a new bucket), so a
    hypothesis test may call it per example.  Only the S3 kind starts the
    session's moto server.
    """
    kind = request.param
    server = request.getfixturevalue("s3_server") if kind == "s3" else None
    made: list[Source] = []

    def make(files: dict[str, bytes] | None = None) -> Source:
        files = files or {}
        source: Source
        if server is not None:
            source = server.source(files)
        elif kind == "local":
            source = LocalSource(tmp_path / f"source{len(made)}", files)
        else:
            source = MemorySource(files)
        made.append(source)
        return source

    try:
        yield make
    finally:
        for source in made:
            source.close()
