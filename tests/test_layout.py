"""The house stays navigable: short modules, a thin callback and pipeline, imports that run one
way (no circle), a README people read, and every benchmark result dated with its machine."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_influence"
MODULES = sorted(PACKAGE.rglob("*.py"))


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set:
    """The package modules ``path`` imports at module level (not inside functions or TYPE_CHECKING)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("lightning_influence"):
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lightning_influence"))
    return found


def test_no_module_is_longer_than_450_lines_and_the_glue_is_thin():
    long = {str(p.relative_to(ROOT)): _lines(p) for p in MODULES if _lines(p) > 450}
    assert not long, long
    for glue in ("callback.py", "audit.py"):
        assert _lines(PACKAGE / glue) <= 300, (glue, _lines(PACKAGE / glue))


def test_the_package_imports_run_one_way():
    known = {_module_name(p) for p in MODULES}
    graph = {_module_name(p): {m for m in _imports(p) if m in known and m != _module_name(p)} for p in MODULES}
    # a package's __init__ re-exports its modules: an arrow into a package is an arrow to its __init__
    seen, stack, cycles = set(), [], []

    def visit(node: str) -> None:
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if not (nxt == node.rsplit(".", 1)[0] or node == nxt.rsplit(".", 1)[0]):  # a package and its parts
                visit(nxt)
        stack.pop()

    for module in sorted(graph):
        visit(module)
    assert not cycles, cycles[:3]


def test_no_stage_reaches_up_to_the_callback_or_the_pipeline():
    stages = [p for p in MODULES if p.name not in ("__init__.py", "callback.py", "pl.py", "audit.py", "cli.py")]
    upward = {str(p.relative_to(ROOT)): sorted(m for m in _imports(p)
                                               if m in ("lightning_influence.callback", "lightning_influence.audit"))
              for p in stages}
    assert not {k: v for k, v in upward.items() if v}


def test_the_readme_is_short():
    assert _lines(ROOT / "README.md") <= 400


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks" / "results").glob("*.json")), ids=lambda p: p.name)
def test_every_benchmark_result_says_when_and_where_it_ran(path):
    doc = json.loads(path.read_text())
    runs = doc if isinstance(doc, list) else [doc]
    for run in runs:
        tables = run.get("tables") or []
        dated = bool(run.get("date")) or (tables and all(t.get("date") for t in tables))
        machined = bool(run.get("machine")) or (tables and all(t.get("machine") for t in tables))
        assert dated and machined, (path.name, sorted(run)[:12])
