"""The package's import graph has no cycles, and the core names no backend.

Two checks, because each misses what the other sees:

- a static one: every ``import`` of every module of ``gateway/`` and
  ``backends/`` (at module level, inside functions, under ``TYPE_CHECKING``:
  all of them, since a late import only hides a cycle) read with ``ast`` into
  a graph of project modules, which must have no cycle (Tarjan's strongly
  connected components, each named with its modules when the test fails);
- a dynamic one: every module imported first, alone, in an interpreter where
  no other project module is loaded yet, so a module that only imports
  because some other module happened to load first is caught.

A module whose third-party dependency is not installed (an optional extra)
is skipped by the dynamic check, never by the static one.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import native

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gateway", "backends")


def project_modules() -> dict[str, Path]:
    """Every module of the project packages by dotted name (a package by its own name)."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a name inside a module: the module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, list[str]]] = [(root, sorted(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, todo = work[-1]
            if todo:
                nxt = todo.pop()
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(graph.get(nxt, ()))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_reader_sees_late_relative_and_type_checking_imports() -> None:
    graph = import_graph()
    assert "gateway.plugins" in graph["gateway.app"]  # relative, module level
    assert "gateway.policy.compile" in graph["gateway.check"]  # inside a function
    assert "gateway.pipeline" in graph["gateway.backend"]  # under TYPE_CHECKING
    assert "gateway.backend" in graph["backends.base"]  # absolute, from another package


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_core_imports_no_backend() -> None:
    """``gateway/`` reaches backends only through ``gateway.backend`` and the entry point group."""
    graph = import_graph()
    offenders = {name: sorted(t for t in targets if t.split(".")[0] == "backends")
                 for name, targets in graph.items() if name.split(".")[0] == "gateway"}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_core_never_names_a_backend_in_code() -> None:
    """No identifier or string of ``gateway/`` code (docstrings aside) names the torch backend."""
    named: list[str] = []
    for name, path in project_modules().items():
        if not name.startswith("gateway"):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            text = (node.value if isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and id(node) not in docstrings else
                    node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else "")
            if "torch" in text.lower():
                named.append(f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}: {text[:60]!r}")
    assert named == []


# Run in a fresh interpreter: import each module with no project module loaded before it.
_ALONE = """
import importlib, json, sys
names = json.loads(sys.argv[1])
packages = tuple(json.loads(sys.argv[2]))
native = set(json.loads(sys.argv[3]))  # compiled (gateway/native.py): loaded once, never again in one process
failed, skipped = {}, []
for name in names:
    for loaded in [m for m in sys.modules if m.split(".")[0] in packages and m not in native]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in packages:
            failed[name] = f"{type(exc).__name__}: {exc}"
        else:
            skipped.append(name)  # an optional third-party dependency is not installed
    except Exception as exc:
        failed[name] = f"{type(exc).__name__}: {exc}"
print(json.dumps({"failed": failed, "skipped": skipped}))
"""


@pytest.mark.slow  # ~10 s: it imports every module, torch among them
def test_every_module_imports_alone_in_a_fresh_interpreter() -> None:
    names = [n for n in project_modules() if not n.endswith("__main__")]
    # a native build's modules stay loaded once imported (mypyc cannot import one twice in a process): there the
    # check is of every other module; CI's pure-Python run checks them all alone
    compiled = [source.removesuffix(".py").replace("/", ".") for source in native.built()]
    proc = subprocess.run([sys.executable, "-c", _ALONE, json.dumps(names), json.dumps(PACKAGES), json.dumps(compiled)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["failed"] == {}
    assert len(result["skipped"]) < len(names) // 4, result["skipped"]  # the check itself still checks
