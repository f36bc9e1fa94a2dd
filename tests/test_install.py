"""How the package is installed: what ``make demo`` installs, and that user
code type-checks against the package as the Makefile installs it."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import ambient_grpc_auth

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(ambient_grpc_auth.__file__).parent
DIST = "ambient-grpc-auth"


def _need(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{program} is required in CI")
        pytest.skip(f"{program} is not installed")
    return path


def _dry_run(target: str, tmp_path: Path) -> list[str]:
    """The commands ``make TARGET`` runs from a clean clone (no .venv yet)."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(ROOT / name, tmp_path / name)
    # Not the settings of a make this test may run under (`make test`).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    result = subprocess.run(
        [_need("make"), "--no-print-directory", "-n", target],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.splitlines()


def test_make_demo_installs_the_runtime_only(tmp_path: Path) -> None:
    commands = _dry_run("demo", tmp_path)
    installs = [c for c in commands if "pip install" in c and "--upgrade pip" not in c]
    assert installs == [".venv/bin/python -m pip install --quiet -e ."], commands
    assert commands[-1] == ".venv/bin/ambient-grpc-auth demo"


def test_make_test_installs_the_dev_extras(tmp_path: Path) -> None:
    commands = _dry_run("test", tmp_path)
    installs = [c for c in commands if "pip install" in c and "--upgrade pip" not in c]
    assert installs == [".venv/bin/python -m pip install --quiet -e '.[dev]'"], commands


def _runtime_distributions() -> set[str]:
    """The package's runtime requirements, transitively (no extras)."""
    seen: set[str] = set()
    todo = [DIST]
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        for line in importlib.metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def _guarded(tree: ast.AST) -> set[ast.AST]:
    """Import statements inside ``try: ... except ImportError``: optional."""
    guarded: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
            for h in node.handlers
        ):
            guarded.update(n for stmt in node.body for n in ast.walk(stmt))
    return guarded


def _top_module(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name.split(".")[0] for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module.split(".")[0]]
    return []


def test_the_runtime_imports_nothing_outside_its_dependencies() -> None:
    """Everything the package imports, anywhere in it, is the standard
    library or a runtime dependency: the install ``make demo`` does is
    enough for every command. An import guarded by ``except ImportError``
    may come from an optional extra declared in pyproject.toml instead."""
    imported: set[str] = set()
    optional: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        guarded = _guarded(tree)
        for node in ast.walk(tree):
            (optional if node in guarded else imported).update(_top_module(node))
    local = set(sys.stdlib_module_names) | {"ambient_grpc_auth"}
    imported -= local
    optional -= local
    providers = importlib.metadata.packages_distributions()
    runtime = _runtime_distributions()

    def dists_of(module: str) -> set[str]:
        return {re.sub(r"[-_.]+", "-", d).lower() for d in providers.get(module, [])}

    outside = {m: sorted(dists_of(m)) for m in sorted(imported) if not dists_of(m) & runtime}
    assert outside == {}
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    declared = {
        re.sub(r"[-_.]+", "-", Requirement(spec).name).lower()
        for name, specs in extras.items()
        if name not in ("test", "dev")
        for spec in specs
    }
    assert {m for m in optional if not dists_of(m) & (runtime | declared)} == set()
    assert "prometheus-client" in runtime


def test_user_code_type_checks_against_the_installed_package(tmp_path: Path) -> None:
    """mypy run on user code outside the repository finds the package and its
    types (an editable install through an import hook would be invisible to
    it: "Cannot find implementation or library stub")."""
    if importlib.util.find_spec("mypy") is None:
        if os.environ.get("CI"):
            pytest.fail("mypy is required in CI (dev extras)")
        pytest.skip("mypy is not installed")
    user = tmp_path / "user.py"
    user.write_text(
        "import ambient_grpc_auth\n"
        "from ambient_grpc_auth.server.metrics import PrometheusMetrics\n\n"
        "version: int = ambient_grpc_auth.__version__\n"
        "metrics: PrometheusMetrics = PrometheusMetrics()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--no-incremental",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--strict",
            "user.py",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert "import-not-found" not in output, output
    assert "import-untyped" not in output, output
    # The one error in the file, found because mypy read the package's types.
    expected = (
        'Incompatible types in assignment (expression has type "str", variable has type "int")'
    )
    assert expected in output, output
    assert "Found 1 error in 1 file" in output, output
