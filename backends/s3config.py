"""Opening an S3 source: its URL, credentials, obstore clients and a first listing.

Policy:

- ``s3://bucket[/prefix]``; the bucket name as S3 accepts it today (3-63
  characters of a-z, 0-9, ``.``, ``-``); no credentials, query or fragment
  in the URL.  Anything else is a one-line SourceError, which never repeats
  a URL that holds credentials.
- The endpoint is the option, else AWS_ENDPOINT_URL_S3, else
  AWS_ENDPOINT_URL, else AWS: ``http(s)://host[:port]``, without
  credentials (those come from the environment, below).  Requests are
  path-style on a custom endpoint or for a bucket with dots, virtual-hosted
  on AWS, unless the option or AWS_VIRTUAL_HOSTED_STYLE_REQUEST says
  otherwise.
- Credentials: none when anonymous (or AWS_SKIP_SIGNATURE); else
  AWS_ACCESS_KEY_ID and friends from the environment; else, when a profile
  is named (AWS_PROFILE) or the shared files exist, boto3's resolution of
  them (profiles, SSO, credential_process, assume-role) if boto3 is
  installed; else obstore's own chain (web identity, ECS container, EC2
  instance metadata).
- Every request has a deadline; obstore retries 5xx, timeouts and broken
  connections a bounded number of times within a bounded window.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import urllib.parse
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import obstore
from obstore.store import S3Store

from backends.s3errors import (
    CREDENTIAL_CODES,
    REGION_CODES,
    describe,
    error_code,
    http_status,
    result_for,
)
from cachefs.contract import RWResult
from cachefs.errors import SourceError

log = logging.getLogger(__name__)

_BUCKET = re.compile(r"^(?!\d+\.\d+\.\d+\.\d+$)(?!.*\.\.)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# what of an endpoint an error may repeat: the scheme and authority, not the path or query
_SCHEME_AND_HOST = re.compile(r"[^/?#]*(?://[^/?#]*)?")
_NO_KEYS = "web identity, container or instance credentials"


def key_ok(key: str) -> bool:
    """Whether *key* can name an object: no empty, ``.`` or ``..`` part."""
    return "\0" not in key and all(p not in ("", ".", "..") for p in key.split("/"))


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    return None if value is None else value.strip().lower() in ("1", "true", "yes", "on")


_USE_THE_ENVIRONMENT = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ``("bucket", "a/b")``; SourceError if malformed."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        shown = "" if "@" in url else f" {url!r}"
        raise SourceError(f"bad S3 URL{shown}: malformed; expected s3://bucket[/prefix]") from None
    if "@" in parts.netloc:
        raise SourceError(
            f"bad S3 URL: credentials do not belong in the URL ({_USE_THE_ENVIRONMENT})"
        )
    if parts.scheme.lower() != "s3":
        raise SourceError(f"bad S3 URL {url!r}: expected s3://bucket[/prefix]")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise SourceError(f"bad S3 URL {url!r}: no query or fragment is allowed")
    bucket = parts.netloc
    if not bucket:
        raise SourceError(f"bad S3 URL {url!r}: no bucket name (s3://bucket[/prefix])")
    if not _BUCKET.match(bucket):
        raise SourceError(
            f"bad S3 URL {url!r}: {bucket!r} is not a valid bucket name "
            "(3-63 characters: a-z, 0-9, '.', '-')"
        )
    prefix = urllib.parse.unquote(parts.path).strip("/")
    if prefix and not key_ok(prefix):
        raise SourceError(f"bad S3 URL {url!r}: the prefix has an empty, '.' or '..' part")
    return bucket, prefix


def credentials(anonymous: bool | None) -> tuple[dict[str, Any], Any, str]:
    """Store config, credential provider, and where the keys come from (for logs)."""
    if anonymous:
        return {"skip_signature": True}, None, "nowhere (anonymous)"
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return {}, None, "the environment"
    profile = os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE")
    files = [
        Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")).expanduser(),
        Path(os.environ.get("AWS_CONFIG_FILE", "~/.aws/config")).expanduser(),
    ]
    if not profile and not any(f.is_file() for f in files):
        return {}, None, _NO_KEYS
    try:
        import boto3  # type: ignore[import-untyped]
        import botocore.exceptions  # type: ignore[import-untyped]
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:
        if profile:
            raise SourceError(
                f"AWS_PROFILE={profile} needs boto3 (pip install boto3), "
                "or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ) from None
        log.warning("the ~/.aws files are read only when boto3 is installed: ignoring them")
        return {}, None, _NO_KEYS
    name = profile or "default"
    try:
        provider = Boto3CredentialProvider(boto3.Session(profile_name=profile))
    except botocore.exceptions.BotoCoreError as e:
        raise SourceError(f"AWS profile {name}: {e}") from None
    except ValueError:
        raise SourceError(f"no AWS credentials in profile {name}, nor elsewhere") from None
    return dict(provider.config), provider, f"profile {name}"


@dataclass(frozen=True, slots=True)
class Target:
    """Where a source is and how to reach it; makes the obstore clients."""

    url: str
    bucket: str
    prefix: str
    endpoint: str | None
    config: dict[str, Any]
    provider: Any
    keys_from: str
    connect_timeout: float
    read_timeout: float

    @property
    def shown(self) -> str:
        return self.endpoint or "AWS S3"

    def store(self, timeout: float | None, retries: int, retry_window: float) -> S3Store:
        """A client: each request gives up after *timeout* s (None: only when
        no byte came for the read timeout), retried *retries* times within
        *retry_window* s."""
        client: dict[str, Any] = {
            "allow_http": bool(self.endpoint and self.endpoint.startswith("http://")),
            "connect_timeout": timedelta(seconds=self.connect_timeout),
            "read_timeout": timedelta(seconds=self.read_timeout),
            "timeout": timedelta(seconds=timeout) if timeout else timedelta(days=1),
        }
        retry: dict[str, Any] = {
            "max_retries": retries,
            "retry_timeout": timedelta(seconds=retry_window),
            "backoff": {
                "init_backoff": timedelta(milliseconds=100),
                "max_backoff": timedelta(seconds=2),
            },
        }
        try:
            return S3Store(
                self.bucket,
                prefix=self.prefix or None,
                config=self.config,  # type: ignore[arg-type]
                client_options=client,  # type: ignore[arg-type]
                retry_config=retry,  # type: ignore[arg-type]
                credential_provider=self.provider,
            )
        except Exception as e:
            raise SourceError(f"{self.url}: {describe(e)}") from None


def resolve(
    url: str,
    *,
    endpoint: str | None,
    anonymous: bool,
    path_style: bool | None,
    region: str | None,
    connect_timeout: float,
    read_timeout: float,
) -> Target:
    """Everything needed to reach *url*, from the options and the environment."""
    bucket, prefix = parse_url(url)
    origin = "the endpoint option"
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if not endpoint:
            origin, endpoint = name, os.environ.get(name)
    config, provider, keys_from = credentials(anonymous or _env_flag("AWS_SKIP_SIGNATURE"))
    if region:
        config["region"] = region
    if path_style is None and _env_flag("AWS_VIRTUAL_HOSTED_STYLE_REQUEST") is not None:
        path_style = not _env_flag("AWS_VIRTUAL_HOSTED_STYLE_REQUEST")
    if path_style is None:
        path_style = bool(endpoint) or "." in bucket
    config["virtual_hosted_style_request"] = not path_style
    if endpoint:
        ep = _parse_endpoint(endpoint, origin)
        endpoint = f"{ep.scheme}://{ep.netloc}"
        config["endpoint"] = endpoint if path_style else f"{ep.scheme}://{bucket}.{ep.netloc}"
    return Target(
        url, bucket, prefix, endpoint, config, provider, keys_from, connect_timeout, read_timeout
    )


def _parse_endpoint(endpoint: str, origin: str) -> urllib.parse.SplitResult:
    """*endpoint* split; SourceError naming *origin* unless ``http(s)://host[:port]``
    (a trailing ``/`` aside).

    The error repeats at most the scheme, host and port: nothing of an
    endpoint with credentials, never a path, query or fragment (a token).
    """
    endpoint = endpoint.strip()
    shown = "" if "@" in endpoint else f" {_scheme_and_host(endpoint)!r}"
    bad = f"bad S3 endpoint{shown} (from {origin}): expected http(s)://host[:port]"
    try:
        ep = urllib.parse.urlsplit(endpoint)
        ep.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise SourceError(bad) from None
    if "@" in ep.netloc:
        raise SourceError(
            f"credentials in the S3 endpoint (from {origin}) are not accepted: "
            f"{_USE_THE_ENVIRONMENT}"
        )
    if ep.scheme not in ("http", "https") or not ep.hostname:
        raise SourceError(bad)
    if ep.path not in ("", "/") or "?" in endpoint or "#" in endpoint:
        raise SourceError(f"{bad}, without a path, query or fragment")
    return ep


def _scheme_and_host(url: str) -> str:
    match = _SCHEME_AND_HOST.match(url)
    return match[0] if match else ""


def check(target: Target, timeout: float) -> None:
    """List the bucket once; SourceError with the reason unless it answers in time.

    The listing runs in a daemon thread, so that not even a credentials
    lookup that ignores its own deadlines can hold the caller past *timeout*.
    """
    store = target.store(timeout, 1, timeout)
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            for _ in obstore.list(store, None, chunk_size=1):
                break
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=probe, name="cachefs-s3-check", daemon=True)
    thread.start()
    thread.join(timeout)
    where = f"{target.url}: {target.shown}"
    if not outcome:
        raise SourceError(f"{where} did not answer within {timeout:g} s")
    error = outcome[0]
    if error is None:
        return
    code, reason = error_code(error), describe(error)
    if code == "NoSuchBucket":
        raise SourceError(f"{where} has no bucket {target.bucket}")
    if code in CREDENTIAL_CODES or http_status(error) == 401:
        raise SourceError(f"{where} refused the credentials from {target.keys_from}: {reason}")
    if code in REGION_CODES or http_status(error) in (301, 307):
        raise SourceError(
            f"{where}: the bucket is in another region (set AWS_REGION or the region option): "
            f"{reason}"
        )
    if result_for(error)[0] is RWResult.PERMANENT_FAILURE:
        raise SourceError(f"{where} cannot be reached: {reason}")
    if "169.254.169.254" in reason or "169.254.170.2" in reason:
        # No keys anywhere, so the SDK asked the instance/container metadata service.
        raise SourceError(
            f"{where}: no AWS credentials found (set AWS_ACCESS_KEY_ID and"
            f" AWS_SECRET_ACCESS_KEY, or --s3-anonymous for a public bucket)"
        )
    raise SourceError(f"{where} refused to list the bucket: {reason}")
