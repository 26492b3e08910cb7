"""The data package's import structure: its modules form a DAG (no import cycle, lazy imports included), each
imports on its own, and an import inside a function says why beside it.

The layers, lowest first (setup.cfg's `data-layers` contract): sources, folders, batches, choice_tasks; tokenizer;
backends, text_bytes; prepare, sft_format; loader, sft_prepare; sft_loader, hf_tokenizer; resolve. resolve.py (what
a data path or a tokenizer argument names, the bundled recipes and their cache) builds on both preparers; they know
where the bundled texts are (sources.py) but nothing below resolve.py imports it. The graph is read from the source,
function-level (lazy) imports included: a lazy import hides a cycle at import time but is a cycle all the same.
"""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
DATA = ROOT / "pretrain" / "data"
MODULES = sorted(p.stem for p in DATA.glob("*.py"))
# Files whose imports sit at the top unless a reason is written beside one.
CHECKED = sorted(DATA.glob("*.py")) + [ROOT / "pretrain" / "cli" / "data.py", ROOT / "pretrain" / "train" / "data.py"]


def data_imports(source: str, module: str = "") -> set[str]:
    """The pretrain.data modules that `source` imports anywhere, inside functions too."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "pretrain.data":
                found.update(a.name for a in node.names)
            elif node.module.startswith("pretrain.data."):
                found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[2] for a in node.names if a.name.startswith("pretrain.data."))
    return (found & set(MODULES)) - {module}


def graph() -> dict[str, set[str]]:
    return {m: data_imports((DATA / f"{m}.py").read_text(), m) for m in MODULES}


def reachable(start: str, graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_graph_reader_sees_lazy_imports():
    source = "import os\n\ndef f():\n    from pretrain.data.resolve import resolve_data_path\n    import pretrain.data.loader\n"
    assert data_imports(source) == {"resolve", "loader"}
    assert "loader" in graph()["resolve"]  # open_dataset's import, inside the function


def test_data_modules_form_a_dag():
    g = graph()
    try:
        order = list(graphlib.TopologicalSorter(g).static_order())
    except graphlib.CycleError as e:
        raise AssertionError(f"import cycle in pretrain/data: {' -> '.join(e.args[1])}") from None
    assert set(order) == set(MODULES)
    # resolve.py is the top: no data module imports it (prepare_sft takes a resolved Tokenizer: no call loop back)
    assert [m for m in MODULES if "resolve" in g[m]] == [], g
    assert {"sft_prepare", "prepare"} <= reachable("resolve", g), g
    # sources (reading texts) and folders (the on-disk format) know nothing of tokenizers or loaders
    assert g["sources"] == set() and g["folders"] == set(), g


def test_imports_inside_functions_give_a_reason():
    missing = []
    for path in CHECKED:
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and "#" not in lines[node.lineno - 1]:
                        missing.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not missing, "imports inside functions without a reason beside them:\n" + "\n".join(missing)


@pytest.mark.processes
def test_each_data_module_imports_alone():
    procs = {m: subprocess.Popen([sys.executable, "-c", f"import pretrain.data.{m}" if m != "__init__" else "import pretrain.data"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for m in MODULES}
    for m, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, f"import pretrain.data.{m} alone failed:\n{err[-2000:]}"


@pytest.mark.processes
def test_lazy_imports_keep_their_promise():
    # datasets is imported inside functions because reading prepared data and training never need it; torch
    # stays out of `import pretrain.data`, of the modules that write folders and of the `pretrain data` commands.
    code = ("import sys, pretrain.data, pretrain.data.resolve, pretrain.data.prepare, pretrain.data.tokenizer, "
            "pretrain.data.sft_format, pretrain.data.sft_prepare, pretrain.cli.data; "
            "print(sorted(m for m in ('datasets', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == "[]"
