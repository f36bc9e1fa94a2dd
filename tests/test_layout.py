"""The package's shape: no import circles, no function-local imports of the
package (the usual way to hide a circle), and no runtime module that reaches
the harnesses under bench/ (they are not in the wheel)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ambient_grpc_auth"
ROOT = "ambient_grpc_auth"


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if "proto" in parts:
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(column, imported module, names) for every import statement."""
    out: list[tuple[int, str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            out.append((node.col_offset, node.module or "", [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((node.col_offset, a.name, []) for a in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for _, module, names in _imports(path):
            submodules = {f"{module}.{n}" for n in names} & modules.keys()
            deps.update(submodules)
            # `from package import submodule` does not use the package's names.
            if module in modules and (not names or len(submodules) < len(names)):
                deps.add(module)
        deps.discard(name)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles() -> None:
    # The front door imports everything; nothing inside may import it back.
    graph = _graph()
    for name, deps in graph.items():
        if name != ROOT:
            assert ROOT not in deps, f"{name} imports the front door"
    assert _cycles(graph) == []


def test_the_checker_sees_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_no_function_local_imports_of_the_package() -> None:
    local = [
        (str(path), module)
        for path in _modules().values()
        for column, module, _ in _imports(path)
        if column > 0 and module.startswith(ROOT)
    ]
    assert local == []


def test_runtime_never_imports_the_harnesses() -> None:
    for name, path in _modules().items():
        for _, module, _ in _imports(path):
            assert module.split(".")[0] != "bench", f"{name} imports {module}"


def test_the_wheel_holds_the_package_only(tmp_path: Path) -> None:
    """The harnesses (bench/) and the tests stay out of the installed wheel;
    the typing marker and the stubs' .pyi files go in."""
    source = tmp_path / "src"
    repo = PACKAGE.parent
    # A copy: an in-tree build would leave build/ and *.egg-info behind.
    shutil.copytree(
        repo,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*cache"
        ),
    )
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    # The packaging metadata is current: no deprecation banner from the backend.
    assert "deprecated" not in (built.stdout + built.stderr).lower()
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {ROOT}
    assert f"{ROOT}/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert f"{ROOT}/proto/ambient/v1/sessions_pb2.pyi" in names


def test_minimum_constraints_pin_every_runtime_floor() -> None:
    """constraints-min.txt (the `make test-min` run) pins each runtime
    dependency at exactly the floor pyproject.toml declares."""
    import re
    import tomllib

    repo = PACKAGE.parent
    declared: dict[str, str] = {}
    for spec in tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?>=([0-9][^,;\s]*).*", spec)
        assert match, f"dependency without a floor: {spec}"
        declared[match.group(1).lower().replace("_", "-")] = match.group(2)
    pinned: dict[str, str] = {}
    for line in (repo / "constraints-min.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pinned[name.lower().replace("_", "-")] = version

    def same(a: str, b: str) -> bool:
        pad = lambda v: (v.split(".") + ["0", "0"])[:3]  # noqa: E731
        return pad(a) == pad(b)

    assert pinned.keys() == declared.keys()
    assert all(same(pinned[n], declared[n]) for n in declared), (pinned, declared)


def test_no_private_name_is_reached_across_modules() -> None:
    """A module may import a private module of the package (``_bearer``), but
    not an underscored name defined inside another module."""
    modules = _modules()
    reached = [
        (name, module, imported)
        for name, path in modules.items()
        for _, module, names in _imports(path)
        if module.startswith(ROOT)
        for imported in names
        if imported.startswith("_")
        and not imported.startswith("__")
        and f"{module}.{imported}" not in modules
    ]
    assert reached == []
