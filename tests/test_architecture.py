"""The architecture contract (docs/ARCHITECTURE.md): import layers checked by import-linter (setup.cfg
`[importlinter]`), imports at module top unless a reason is written beside them, no private (`_name`) name used
across packages, and one module per command that imports no other command's module."""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys

import pytest

from pretrain.cli import commands

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("models", "pretrain", "launch")


@pytest.mark.processes
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
                imports = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
                import_lines = {n for node in imports for n in range(node.lineno, node.end_lineno + 1)}  # 1-based
                for node in imports:
                    if id(node) not in top:
                        n = node.lineno - 1
                        while n > 0 and n in import_lines:
                            n -= 1  # the first line of a block of imports (a statement may span lines)
                        reason = "#" in lines[node.lineno - 1] or (n > 0 and lines[n - 1].lstrip().startswith("#"))
                        found.append((os.path.relpath(path, REPO), node.lineno, lines[node.lineno - 1].strip(), reason))
    return found


def test_imports_at_module_top_or_with_a_reason():
    unexplained = [f"{f}:{n}: {text}" for f, n, text, reason in function_level_imports() if not reason]
    assert not unexplained, "imports inside functions without a reason comment:\n" + "\n".join(unexplained)


# ------------------------------------------------------------------------------------------ private names, commands

# Where a private name may not be imported from another package: every importer outside tests/.
SOURCE_DIRS = (*PACKAGES, "scripts", "benchmarks")


def python_files(*dirs: str) -> list[str]:
    """Repository-relative paths of the .py files under `dirs`."""
    found = []
    for top in dirs:
        for base, subdirs, files in os.walk(os.path.join(REPO, top)):
            subdirs[:] = sorted(d for d in subdirs if d != "__pycache__")
            found += [os.path.relpath(os.path.join(base, f), REPO) for f in sorted(files) if f.endswith(".py")]
    return found


def module_file(module: str) -> str | None:
    """The repository-relative file of an in-repository module (a.b -> a/b.py or a/b/__init__.py), else None."""
    path = os.path.join(*module.split("."))
    for candidate in (path + ".py", os.path.join(path, "__init__.py")):
        if os.path.isfile(os.path.join(REPO, candidate)):
            return candidate
    return None


def module_name(path: str) -> str:
    parts = path[:-len(".py")].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def absolute(node: ast.ImportFrom, importer: str) -> str:
    """The module a `from ... import` names, relative imports resolved against the importing file."""
    if not node.level:
        return node.module or ""
    base = module_name(importer).split(".")
    base = base[:len(base) - node.level + (1 if importer.endswith("__init__.py") else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.endswith("__")


def private_imports(path: str) -> list[tuple[int, str, str]]:
    """(line, private name, module file) of each private name `path` takes from a module of another package:
    `from X import _name`, and `X._name` after `import X` / `from P import X` (X a module)."""
    with open(os.path.join(REPO, path)) as f:
        tree = ast.parse(f.read())
    here = os.path.dirname(path)
    found, modules = [], {}  # modules: local name -> the in-repository module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    modules[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    modules[top] = top
        elif isinstance(node, ast.ImportFrom):
            source = absolute(node, path)
            for alias in node.names:
                if module_file(f"{source}.{alias.name}"):
                    modules[alias.asname or alias.name] = f"{source}.{alias.name}"
                elif is_private(alias.name) and module_file(source):
                    found.append((node.lineno, alias.name, module_file(source)))
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and is_private(node.attr)):
            continue
        chain, value = [], node.value
        while isinstance(value, ast.Attribute):
            chain.insert(0, value.attr)
            value = value.value
        if isinstance(value, ast.Name) and value.id in modules:
            target = module_file(".".join([modules[value.id], *chain]))
            if target:
                found.append((node.lineno, node.attr, target))
    return [(line, name, target) for line, name, target in found if os.path.dirname(target) != here]


def test_no_private_name_imported_across_packages():
    """A leading underscore means "this package's business": another package (directory) that needs the name needs
    it public. Within one package (models/hf/*.py from models/hf/__init__.py) private names are fine; tests/ may
    reach into anything."""
    offenders = []
    for path in python_files(*SOURCE_DIRS):
        for line, name, target in private_imports(path):
            offenders.append(
                f"{path}:{line} uses the private name `{name}` of {target}, another package ({os.path.dirname(target)}/"
                f"): make it public there (rename it to `{name.lstrip('_')}` and use that name everywhere), or move "
                f"the code that needs it into {os.path.dirname(target)}/")
    assert not offenders, "private names used across packages:\n" + "\n".join(offenders)


def imported_modules(path: str) -> set[str]:
    """Every in-repository module `path` imports (anywhere in the file), as dotted names."""
    with open(os.path.join(REPO, path)) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = absolute(node, path)
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return {n for n in names if module_file(n)}


def test_command_modules_do_not_import_each_other():
    """One module per command (`commands()`); what two commands share is a library module or the CLI's plumbing
    (pretrain/cli/spawn.py, arguments.py), never another command's module."""
    names = {c.__name__ for c in commands()}
    offenders = []
    for command in sorted(names):
        path = module_file(command)
        for other in sorted(imported_modules(path) & (names - {command})):
            offenders.append(f"{path} imports the command module {other}: move what both need into a library "
                             "module (pretrain/analysis/, pretrain/state/, ...) or, for argparse plumbing, into "
                             "pretrain/cli/arguments.py, and import it from there")
    assert not offenders, "\n".join(offenders)


def test_each_command_module_registers_one_command():
    """`pretrain --help` lists one top-level command per module of `commands()`."""
    for command in commands():
        sub = argparse.ArgumentParser().add_subparsers()
        command.register(sub)
        assert len(sub.choices) == 1, (f"{command.__name__} registers {sorted(sub.choices)}: give each top-level "
                                       "command its own module in pretrain/cli/ and its name in commands()")
