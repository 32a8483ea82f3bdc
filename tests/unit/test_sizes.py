from __future__ import annotations

import pytest

from cachefs.errors import InvalidSize
from cachefs.units import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("4096", 4096),
        ("4K", 4096),
        ("4k", 4096),
        ("64KiB", 64 << 10),
        ("1M", 1 << 20),
        ("1MB", 1 << 20),
        ("10G", 10 << 30),
        ("2T", 2 << 40),
        (" 1.5K ", 1536),
        ("512B", 512),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "K", "-1K", "1.5", "0.1K", "12Q", "1 M B", "1e3", "4KK"])
def test_bad_sizes_name_the_input(text: str) -> None:
    with pytest.raises(InvalidSize) as info:
        parse_size(text)
    assert repr(text) in str(info.value)
    assert "\n" not in str(info.value)


def test_invalid_size_is_a_config_error() -> None:
    assert InvalidSize.exit_code == 2


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (64 << 20, "64.0 MiB")],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text
