"""The documentation as printed: its example backend runs, its links lead somewhere."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest

from cachefs import Backend, open_file_cache

ROOT = Path(__file__).resolve().parents[2]
BACKENDS_PAGE = ROOT / "docs" / "backends.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def example_module() -> types.ModuleType:
    blocks = re.findall(r"```python\n(.*?)```", BACKENDS_PAGE.read_text(), re.S)
    (source,) = [b for b in blocks if b.startswith("# mybackend.py")]
    module = types.ModuleType("mybackend")
    exec(compile(source, "docs/backends.md:mybackend.py", "exec"), module.__dict__)
    return module


async def test_the_documented_backend_serves_its_file_through_the_engine(tmp_path: Path) -> None:
    backend = example_module().open_backend("dict://")
    assert isinstance(backend, Backend)
    async with open_file_cache(backend, tmp_path) as cache:
        assert [e.name for e in await cache.list_dir("")] == ["hello.txt"]
        fh = await cache.open("hello.txt")
        assert await cache.read(fh, 0, 100) == b"hello world\n"
        assert await cache.read(fh, 6, 5) == b"world"
        await cache.close(fh)
        assert cache.statistics()["read_data_calls"] == 1


def prose(text: str) -> str:
    """*text* without its fenced code blocks, which hold no links or headings."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown page."""
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", prose(text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n, candidate = 0, slug
        while candidate in found:
            n += 1
            candidate = f"{slug}-{n}"
        found.add(candidate)
    return found


def relative_links(text: str) -> list[str]:
    """The targets of the Markdown links of *text* that stay in this repository."""
    targets = re.findall(r"\]\(([^)\s]+)\)", prose(text))
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """Each relative link of *page* whose file or heading does not exist."""
    broken = []
    for target in relative_links(page.read_text()):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no file {linked.relative_to(root)}")
        elif anchor and anchor not in anchors(linked.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(root)}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading(page: Path) -> None:
    assert broken_links(page) == []


def test_the_link_check_sees_a_missing_file_and_a_missing_heading(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n\n## A `code` heading: here\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md#a-code-heading-here) [ok](#page) [web](https://example.org)\n"
        "[gone](missing.md) [no anchor](other.md#nowhere)\n\n```sh\n[in code](ignored.md)\n```\n"
    )
    assert broken_links(page, root=tmp_path) == [
        "missing.md: no file missing.md",
        "other.md#nowhere: no heading #nowhere in other.md",
    ]


def test_the_readme_stays_a_front_page() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert "./mount.sh SOURCE MOUNTPOINT\n.ci/test\n" in readme
