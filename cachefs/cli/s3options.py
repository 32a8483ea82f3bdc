"""The ``--s3-*`` options of ``cachefs mount`` and ``publish``: parsed, checked, forwarded.

They become the keyword options of the s3 backend's factory
(``open_backend(url, endpoint=, region=, anonymous=, path_style=)``); this
module only knows their names, never imports the backend.  They are refused
for a source that is not ``s3://``, and what is not given is left to the
backend, which reads the standard AWS environment.
"""

from __future__ import annotations

import argparse
import os
import re
import urllib.parse
from typing import Any

from cachefs.errors import ConfigError
from cachefs.registry import source_scheme

SCHEME = "s3"
# factory option -> the flag that sets it (path_style: False is --s3-virtual-hosted)
FLAGS = {
    "endpoint": "--s3-endpoint",
    "region": "--s3-region",
    "anonymous": "--s3-anonymous",
    "path_style": "--s3-path-style",
}


_CREDENTIALS = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
_REGION = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_SCHEME_AND_HOST = re.compile(r"[^/?#]*(?://[^/?#]*)?")


def endpoint_problem(url: str) -> str | None:
    """Why *url* is no S3 endpoint (``http(s)://host[:port]``), or None if it is one.

    User info (``user:secret@``), a path (but ``/``), a query and a fragment
    are refused.  The answer shows at most the scheme, host and port: never
    what follows them, and nothing of a URL holding an ``@``, which may be a
    secret (``?token=``, ``user:secret@``).
    """
    url = url.strip()
    shown = "" if "@" in url else f" {_scheme_and_host(url)!r}"
    expected = "expected http(s)://host[:port]"
    if any(c.isspace() or not c.isprintable() for c in url):
        return f"bad S3 endpoint{shown}: it holds spaces or control characters"
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        detail = f" ({e})" if shown else ""
        return f"bad S3 endpoint{shown}: malformed{detail}; {expected}"
    if "@" in parts.netloc:
        return f"credentials in the S3 endpoint are not accepted: give them in {_CREDENTIALS}"
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return f"bad S3 endpoint{shown}: {expected}"
    extra = [
        name
        for name, given in (
            ("a path", parts.path not in ("", "/")),
            ("a query", "?" in url),
            ("a fragment", "#" in url),
        )
        if given
    ]
    if extra:
        return f"bad S3 endpoint{shown}: it has {', '.join(extra)}; {expected}"
    return None


def _scheme_and_host(url: str) -> str:
    """What of *url* may be repeated: its scheme and authority, never its path or query."""
    match = _SCHEME_AND_HOST.match(url)
    return match[0] if match else ""


def endpoint(text: str) -> str:
    problem = endpoint_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text.strip()


def _region(text: str) -> str:
    if not _REGION.match(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a region name (1-64 letters, digits, '.', '_', '-')"
        )
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--s3-*`` options, in a group of their own."""
    group = parser.add_argument_group(
        "S3 sources (s3://BUCKET[/PREFIX])",
        "Credentials come from the standard AWS environment (AWS_ACCESS_KEY_ID, "
        "AWS_PROFILE with boto3, instance roles); these options only apply to s3:// sources.",
    )
    group.add_argument(
        "--s3-endpoint",
        metavar="URL",
        type=endpoint,
        help="an S3-compatible server, e.g. http://minio:9000 "
        "(default: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, else AWS)",
    )
    group.add_argument(
        "--s3-region",
        metavar="REGION",
        type=_region,
        help="the bucket's region (default: $AWS_REGION, $AWS_DEFAULT_REGION, else us-east-1)",
    )
    group.add_argument(
        "--s3-anonymous",
        action="store_true",
        help="send unsigned requests, for public buckets",
    )
    style = group.add_mutually_exclusive_group()
    style.add_argument(
        "--s3-path-style",
        dest="s3_path_style",
        action="store_const",
        const=True,
        help="address the bucket as http(s)://host/BUCKET (default on a custom endpoint "
        "or for a bucket name with dots)",
    )
    style.add_argument(
        "--s3-virtual-hosted",
        dest="s3_path_style",
        action="store_const",
        const=False,
        help="address the bucket as http(s)://BUCKET.host (default on AWS)",
    )


def from_args(args: argparse.Namespace, source: str) -> dict[str, Any]:
    """The factory options the user gave; ConfigError if *source* is not ``s3://``."""
    given: dict[str, Any] = {
        "endpoint": args.s3_endpoint,
        "region": args.s3_region,
        "anonymous": args.s3_anonymous or None,
        "path_style": args.s3_path_style,
    }
    options = {name: value for name, value in given.items() if value is not None}
    if options and source_scheme(source) != SCHEME:
        flags = ", ".join(_flag(name, value) for name, value in options.items())
        raise ConfigError(f"{flags}: only for s3:// sources, not {source}")
    return options


def _flag(name: str, value: Any) -> str:
    if name == "path_style" and value is False:
        return "--s3-virtual-hosted"
    return FLAGS[name]


def cache_identity(source: str, options: dict[str, Any]) -> str:
    """What names a source's default cache dir: *source* itself, except for ``s3://``,
    where the bucket and prefix (trailing slashes aside) and the endpoint count."""
    if source_scheme(source) != SCHEME:
        return source
    origin, endpoint = "--s3-endpoint", options.get("endpoint")
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if not endpoint:
            origin, endpoint = name, os.environ.get(name)
    if endpoint:
        problem = endpoint_problem(endpoint)
        if problem is not None:
            raise ConfigError(f"{origin}: {problem}")
        ep = urllib.parse.urlsplit(endpoint.strip())
        where = f"{ep.scheme.lower()}://{ep.netloc.lower()}"
    else:
        where = "aws"
    try:
        parts = urllib.parse.urlsplit(source)
    except ValueError:
        raise ConfigError("bad S3 URL: malformed; expected s3://bucket[/prefix]") from None
    prefix = urllib.parse.unquote(parts.path).strip("/")
    return f"s3://{parts.netloc}/{prefix} at {where}"
