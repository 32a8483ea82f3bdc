"""The ``--s3-*`` options of ``cachefs mount``: parsed, checked, forwarded.

They become the keyword options of the s3 backend's factory
(``open_backend(url, endpoint=, region=, anonymous=, path_style=)``); this
module only knows their names, never imports the backend.  They are refused
for a source that is not ``s3://``, and what is not given is left to the
backend, which reads the standard AWS environment.
"""

from __future__ import annotations

import argparse
import os
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


def _endpoint(text: str) -> str:
    parts = urllib.parse.urlsplit(text.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(
            f"bad S3 endpoint {text!r}: expected http(s)://host[:port]"
        )
    return text.strip()


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
        type=_endpoint,
        help="an S3-compatible server, e.g. http://minio:9000 "
        "(default: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, else AWS)",
    )
    group.add_argument(
        "--s3-region",
        metavar="REGION",
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


def to_argv(options: dict[str, Any]) -> list[str]:
    """The flags that give *options* again (for the daemon's command line)."""
    argv = []
    for name, value in options.items():
        if isinstance(value, bool):
            if value or name == "path_style":
                argv.append(_flag(name, value))
        else:
            argv.append(f"{FLAGS[name]}={value}")
    return argv


def cache_identity(source: str, options: dict[str, Any]) -> str:
    """What names a source's default cache dir: *source* itself, except for ``s3://``,
    where the bucket and prefix (trailing slashes aside) and the endpoint count."""
    if source_scheme(source) != SCHEME:
        return source
    endpoint = (
        options.get("endpoint")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    if endpoint:
        ep = urllib.parse.urlsplit(endpoint.strip())
        where = f"{ep.scheme.lower()}://{ep.netloc.lower()}"
    else:
        where = "aws"
    parts = urllib.parse.urlsplit(source)
    prefix = urllib.parse.unquote(parts.path).strip("/")
    return f"s3://{parts.netloc}/{prefix} at {where}"
