"""The docs point at things that exist: test references name real tests, file
paths name real files, and docs/architecture.md names every module of the
package."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ambient_grpc_auth"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Modules docs/architecture.md describes before they land in this tree. Once
# a module exists the entry is inert; delete it then, and rename the docs'
# mention if the module ended up with another name.
PENDING: frozenset[str] = frozenset()

# The placeholder in docs/security.md's "run one with ..." sentence.
_EXAMPLE_REFERENCE = "tests/file.py::test_name"


def _inline_code(text: str) -> list[str]:
    """The inline code spans of a Markdown text, fenced blocks left out."""
    prose = re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.S | re.M)
    return re.findall(r"`([^`\n]+)`", prose)


def cited_tests(text: str) -> set[tuple[str, str]]:
    """``(file, test name)`` of every ``tests/<...>.py::test_name`` in ``text``."""
    cited: set[tuple[str, str]] = set(re.findall(r"\b(tests/[\w/]+\.py)::(\w+)", text))
    file, name = _EXAMPLE_REFERENCE.split("::")
    return cited - {(file, name)}


def file_paths(text: str) -> set[str]:
    """Every file (``*.py``) or folder (``name/``) path written alone in inline code."""
    return {
        span
        for span in _inline_code(text)
        if re.fullmatch(r"[A-Za-z_.][\w.-]*(?:/[\w.-]+)*(?:\.py|/)", span)
    }


def path_exists(path: str) -> bool:
    """Relative to the repository root, or else to the package folder."""
    return (ROOT / path).exists() or (PACKAGE / path).exists()


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: p.name)
def test_test_references_name_real_tests(doc: Path) -> None:
    missing = []
    for file, name in sorted(cited_tests(doc.read_text(encoding="utf-8"))):
        path = ROOT / file
        if not path.is_file() or name not in _test_names(path):
            missing.append(f"{file}::{name}")
    assert missing == [], f"{doc.name} cites tests that do not exist"


def test_security_review_cites_tests() -> None:
    # The check above must have something to check.
    assert len(cited_tests((ROOT / "docs" / "security.md").read_text())) > 50


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: p.name)
def test_file_paths_exist(doc: Path) -> None:
    paths = file_paths(doc.read_text(encoding="utf-8"))
    assert not {p for p in paths if not path_exists(p) and p not in PENDING}


def test_path_checks_tell_real_from_stale() -> None:
    text = (
        "`client/_refresh.py`, `bench/hotpath.py`, `tests/support/`, `proto/`, "
        "`client/cpsource.py`, `ambient_grpc_auth/_proto/`, `make bench`, "
        "`x.py::y`, see `tests/server/test_server_jwks.py::test_fetch_timeout` "
        "and `tests/test_cpsource.py::test_malformed_urls`\n"
        "```\nserver/serverconfig.py\n```\n"
    )
    paths = file_paths(text)
    assert paths == {
        "client/_refresh.py",
        "bench/hotpath.py",
        "tests/support/",
        "proto/",
        "client/cpsource.py",
        "ambient_grpc_auth/_proto/",
    }
    assert {p for p in paths if not path_exists(p)} == {
        "client/cpsource.py",
        "ambient_grpc_auth/_proto/",
    }
    assert cited_tests(text) == {
        ("tests/server/test_server_jwks.py", "test_fetch_timeout"),
        ("tests/test_cpsource.py", "test_malformed_urls"),
    }


def test_architecture_names_every_module() -> None:
    named = file_paths(ARCHITECTURE.read_text(encoding="utf-8"))
    modules = {
        path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*.py")
        if "proto" not in path.relative_to(PACKAGE).parts
        and not (path.name == "__init__.py" and path.parent != PACKAGE)
    }
    unnamed = sorted(modules - named)
    assert unnamed == [], "docs/architecture.md should say where these modules fit"
