"""The shape of the house: imports point down, no cycles, functions that fit on a screen.

docs/ARCHITECTURE.md draws the packages; this test keeps the drawing true. A new package
gets a row in ``LAYERS``; an import from a lower layer into a higher one, between two
applications, or any import cycle (function-local imports included, since a local import
that closes a circle only hides it) fails here with the edge that broke the rule.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lower number = lower layer. A package may import its own layer's package and lower ones.
# Packages that share a number are siblings and must not import each other.
LAYERS: dict[str, int] = {
    "casam_core": 0,  # errors, files, names, ownership, CLI frame: imports no casam package
    "casam_io": 1,  # Scan, readers, intensity
    "runtime": 2,  # the torch-free edge runtime
    "casam_bundle": 3,  # the bundle format
    "models": 4,  # torch modules
    "trainer": 5,  # casam-train
    "casam_export": 5,  # casam-export
    "casam_pacs": 2,  # DICOMweb client (QIDO, WADO-RS, STOW-RS): a sibling of runtime
    "casam_infer": 6,  # casam-infer
    "casam_serve": 6,  # casam-serve
    "casam_label": 6,  # casam-label (interactive server)
}
MAX_LINES = 60
MAX_PARAMS = 8


def _modules() -> Iterator[tuple[str, Path]]:
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            yield name, path


MODULES = dict(_modules())


def _resolve(name: str) -> Optional[str]:
    """The casam module an import statement's dotted name loads (longest known prefix)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def _imports(path: Path, module: str) -> Iterator[tuple[str, int]]:
    """(imported casam module, line) for every import in the file, local ones included."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # ``from pkg import sub`` imports the submodule when one exists.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            resolved = _resolve(target)
            if resolved is not None and resolved != module:
                yield resolved, node.lineno


def _graph() -> dict[str, set[str]]:
    return {name: {t for t, _ in _imports(path, name)} for name, path in MODULES.items()}


def _layer_violations() -> list[str]:
    bad = []
    for name, path in MODULES.items():
        own = name.split(".")[0]
        for target, line in _imports(path, name):
            other = target.split(".")[0]
            if other != own and LAYERS[other] >= LAYERS[own]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {own} (layer {LAYERS[own]}) imports {target} "
                           f"(layer {LAYERS[other]})")
    return bad


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_every_package_has_a_layer() -> None:
    for path in ROOT.iterdir():
        if (path / "__init__.py").is_file() and path.name not in {"tests", "bench"}:
            assert path.name in LAYERS, f"package {path.name} has no row in LAYERS (and docs/ARCHITECTURE.md)"


def test_imports_point_down() -> None:
    bad = _layer_violations()
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


def test_no_import_cycles() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (local imports included):\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_cycles() -> None:
    """The checks above are only as good as this: a planted circle must be found."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _functions() -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{path.relative_to(ROOT)}:{node.lineno} {node.name}", node


def _params(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    args = node.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    return len([n for n in names if n not in ("self", "cls")])


@pytest.mark.parametrize("limit", ["lines", "params"])
def test_functions_fit_on_a_screen(limit: str) -> None:
    """No function over 60 lines (docstring included) or over 8 named parameters; click
    commands take ``**options`` and build their option dataclasses."""
    bad = []
    for where, node in _functions():
        lines = (node.end_lineno or node.lineno) - node.lineno + 1
        if limit == "lines" and lines > MAX_LINES:
            bad.append(f"{where}: {lines} lines")
        if limit == "params" and _params(node) > MAX_PARAMS:
            bad.append(f"{where}: {_params(node)} parameters")
    assert not bad, f"functions over the {limit} limit:\n" + "\n".join(bad)
