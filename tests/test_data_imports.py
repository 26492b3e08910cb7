"""The data package's import structure: every module imports on its own, and bundled.py sits on no import cycle.

bundled.py (the bundled corpus's recipe and cache) builds on prepare.py; prepare.py knows where the bundled texts
are but never imports bundled.py. The graph is read from the source, function-level (lazy) imports included:
a lazy import hides a cycle at import time but is a cycle all the same.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "pretrain" / "data"
MODULES = sorted(p.stem for p in DATA.glob("*.py"))


def data_imports(module: str) -> set[str]:
    """The pretrain.data modules `module` imports anywhere in its source."""
    tree = ast.parse((DATA / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "pretrain.data":
                found.update(a.name for a in node.names)
            elif node.module.startswith("pretrain.data."):
                found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[2] for a in node.names if a.name.startswith("pretrain.data."))
    return (found & set(MODULES)) - {module}


def reachable(start: str, graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_graph_reader_sees_lazy_imports():
    # loader.open_dataset imports bundled inside the function: the reader must count it
    assert "bundled" in data_imports("loader") and "prepare" in data_imports("bundled")


def test_bundled_is_on_no_import_cycle():
    graph = {m: data_imports(m) for m in MODULES}
    assert "bundled" not in reachable("prepare", graph), graph
    assert "bundled" not in reachable("bundled", graph), graph


def test_each_data_module_imports_alone():
    procs = {m: subprocess.Popen([sys.executable, "-c", f"import pretrain.data.{m}" if m != "__init__" else "import pretrain.data"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for m in MODULES}
    for m, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, f"import pretrain.data.{m} alone failed:\n{err[-2000:]}"
