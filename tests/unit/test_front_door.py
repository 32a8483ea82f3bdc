"""The public front door: what ``import cachefs`` offers, and what it costs a backend."""

from __future__ import annotations

import subprocess
import sys

import cachefs


def test_every_public_name_resolves() -> None:
    for name in cachefs.__all__:
        assert getattr(cachefs, name) is not None, name


def test_a_backend_importing_the_contract_loads_neither_engine_nor_cryptography() -> None:
    probe = (
        "import sys, cachefs.contract, cachefs.errors\n"
        "print(sorted(m for m in sys.modules if m.startswith(('cachefs.engine', 'cryptography'))))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        cachefs.NoSuchThing  # noqa: B018
    except AttributeError as e:
        assert "NoSuchThing" in str(e)
    else:
        raise AssertionError("cachefs.NoSuchThing resolved")
