"""Cross-references in docstrings (``:func:`ambient_grpc_auth...``` and the
like) name things that exist, so that a move or a rename cannot leave a
docstring pointing at nothing."""

from __future__ import annotations

import re
from pathlib import Path

from support.names import resolves

ROOT = Path(__file__).resolve().parents[1]
_ROLE = re.compile(r":(?:func|class|mod|meth|data|attr|exc|obj):`~?(ambient_grpc_auth(?:\.\w+)+)`")


def _references() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for folder in ("ambient_grpc_auth", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            if "proto" in path.relative_to(ROOT).parts:
                continue
            for name in _ROLE.findall(path.read_text()):
                found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def test_docstring_references_resolve() -> None:
    stale = {name: sorted(where) for name, where in _references().items() if not resolves(name)}
    assert stale == {}


def test_the_check_sees_a_stale_reference() -> None:
    assert resolves("ambient_grpc_auth.client.env.token_source_from_env")
    assert not resolves("ambient_grpc_auth.client.tokens.token_source_from_env")
    assert _ROLE.findall(":func:`~ambient_grpc_auth.a.b` and :class:`ambient_grpc_auth.c`") == [
        "ambient_grpc_auth.a.b",
        "ambient_grpc_auth.c",
    ]
