"""The README's example backend runs under the engine as printed."""

from __future__ import annotations

import re
import types
from pathlib import Path

from cachefs import Backend, open_file_cache

README = Path(__file__).resolve().parents[2] / "README.md"


def example_module() -> types.ModuleType:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    (source,) = [b for b in blocks if b.startswith("# mybackend.py")]
    module = types.ModuleType("mybackend")
    exec(compile(source, "README.md:mybackend.py", "exec"), module.__dict__)
    return module


async def test_the_readme_backend_serves_its_file_through_the_engine(tmp_path):
    backend = example_module().open_backend("dict://")
    assert isinstance(backend, Backend)
    async with open_file_cache(backend, tmp_path) as cache:
        assert [e.name for e in await cache.list_dir("")] == ["hello.txt"]
        fh = await cache.open("hello.txt")
        assert await cache.read(fh, 0, 100) == b"hello world\n"
        assert await cache.read(fh, 6, 5) == b"world"
        await cache.close(fh)
        assert cache.statistics()["read_data_calls"] == 1
