"""The architecture contract (docs/ARCHITECTURE.md): import layers checked by import-linter (setup.cfg
`[importlinter]`), and imports at module top unless a reason is written beside them."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("models", "pretrain", "launch")


def test_import_contracts_hold():
    """Layers (pretrain/cli on top ... pretrain/errors at the bottom; models below everything) and no cycles."""
    proc = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " 0 broken" in proc.stdout.split("Contracts:")[-1], proc.stdout[-2000:]


def function_level_imports() -> list[tuple[str, int, str, bool]]:
    """(file, line, import text, has a reason) of every import inside a function, class body or conditional block of
    the packages; a reason is a comment on the import's line or on the line right above it (a block of imports shares
    the comment above its first line)."""
    found = []
    for package in PACKAGES:
        for base, _dirs, files in os.walk(os.path.join(REPO, package)):
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(base, name)
                with open(path) as f:
                    text = f.read()
                lines = text.splitlines()
                tree = ast.parse(text)
                top = {id(node) for node in tree.body}
                for node in ast.walk(tree):
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                        n = node.lineno - 1
                        while n > 0 and lines[n - 1].lstrip().startswith(("from ", "import ")):
                            n -= 1  # the first line of a block of imports
                        reason = "#" in lines[node.lineno - 1] or (n > 0 and lines[n - 1].lstrip().startswith("#"))
                        found.append((os.path.relpath(path, REPO), node.lineno, lines[node.lineno - 1].strip(), reason))
    return found


def test_imports_at_module_top_or_with_a_reason():
    unexplained = [f"{f}:{n}: {text}" for f, n, text, reason in function_level_imports() if not reason]
    assert not unexplained, "imports inside functions without a reason comment:\n" + "\n".join(unexplained)
