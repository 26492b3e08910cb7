"""A new norm scheme really is one entry plus its hand-written formula: docs/ARCHITECTURE.md's "Recipe: add a norm
scheme", followed literally.

The recipe's two code blocks (the `NORM_SCHEMES` entry that goes into models/norms.py, the formula registration that
goes into tests/helpers/scheme_formulas.py) are written, as the docs have them, into two temporary modules with the imports
those files have in scope, and loaded into a pytest subprocess as plugins (`-p`), so that the table holds the new
scheme before the test modules build their parametrizations from it. The scheme-iterating tests then run on it: its
ids must be there and pass (the formula checks, the parameter count, the pipeline stages, TP = 2 against TP = 1,
the refused HF export with the entry's default reason, `pretrain config` validation). With the entry alone, the
formula test must ask for the formula by name. Nothing of this touches this process's table.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from helpers import scheme_formulas

SCHEME = "lns_inverse"  # the recipe's example
RECIPE = "## Recipe: add a norm scheme"
# The test modules that iterate over NORM_SCHEMES (found under the tests folder by name), and the tests in them that
# iterate inside one test rather than in its parametrization (selected by name besides the scheme's ids).
SCHEME_TEST_FILES = ("test_norm_schemes.py", "test_model.py", "test_tensor_parallel.py", "test_hf_parity.py",
                     "test_config_validation.py", "test_plan.py", "test_residual_streams.py")
ITERATING_INSIDE = ("test_preset_parameter_counts", "test_schemes_refuse_keys_they_do_not_compose_with",
                    "test_export_table_covers_the_issue", "test_scheme_list_is_complete")
# Test modules that iterate over NORM_SCHEMES but are not run here, and why.
NOT_RUN = {
    "test_fidelity.py": "trains every scheme 200 steps in two spawned workers (a minute and more on two cores); "
                        "its worker processes do not load this test's plugins",
    Path(__file__).name: "this test",
    "test_parametrization.py": "it patches ln_free's entry and checks the names of the parametrization refusals; "
                               "it iterates over no scheme",
}
# The tests that must have run on the scheme (a test function name, and how many of its ids name the scheme).
REQUIRED = {
    "test_every_block_matches_formula": 1, "test_whole_model_matches_formula": 1, "test_final_norm": 1,
    "test_forward_backward_smoke": 1,
    "test_tp_layers_are_megatron": 2, "test_tp_init_matches_single_process": 2,
    "test_tp_logits_loss_and_grads_match_single_process": 2,
    "test_export_refuses_schemes_no_stock_class_has": 1,
    "test_every_norm_scheme_is_a_valid_config_value": 1,
}
MIN_SCHEME_TESTS = sum(REQUIRED.values())


def _repo() -> Path:
    """The checkout's root: the nearest folder above the helpers that holds setup.cfg and models/."""
    for folder in Path(scheme_formulas.__file__).resolve().parents:
        if (folder / "setup.cfg").is_file() and (folder / "models").is_dir():
            return folder
    raise AssertionError("no repository root above " + scheme_formulas.__file__)


REPO = _repo()
TESTS = REPO / "tests"  # on the subprocess's path as pytest puts it there (the helpers package lives in it)


def scheme_test_files() -> list[Path]:
    found = {}
    for name in SCHEME_TEST_FILES:
        paths = sorted(REPO.glob(f"tests/**/{name}"))
        assert len(paths) == 1, f"{name}: expected one file under tests/, found {paths}"
        found[name] = paths[0]
    return list(found.values())


def recipe_code() -> tuple[str, str]:
    """(the entry's code, the formula's code): the Python blocks of the recipe in docs/ARCHITECTURE.md."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    assert RECIPE in text, f"docs/ARCHITECTURE.md has no section {RECIPE!r}"
    section = text.split(RECIPE, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    entry = [b for b in blocks if f'NORM_SCHEMES["{SCHEME}"]' in b]
    formula = [b for b in blocks if f'block_formula_of("{SCHEME}")' in b]
    assert len(entry) == 1 and len(formula) == 1, f"the recipe's code blocks: {blocks}"
    return entry[0], formula[0]


def write_plugins(folder: Path, with_formula: bool = True) -> list[str]:
    """The recipe's code as modules in `folder`, each with the imports its file (models/norms.py,
    tests/helpers/scheme_formulas.py) has in scope; their names, to load with `-p`."""
    entry, formula = recipe_code()
    (folder / f"{SCHEME}_scheme.py").write_text(
        "from models.config import ModelConfig\n"
        "from models.norms import NORM_SCHEMES, BlockParts, NormScheme, _final_norm, norm\n\n" + entry)
    plugins = [f"{SCHEME}_scheme"]
    if with_formula:
        (folder / f"{SCHEME}_formula.py").write_text("from helpers.scheme_formulas import Ops, block_formula_of\n\n" + formula)
        plugins.append(f"{SCHEME}_formula")
    return plugins


def run_pytest(tmp_path: Path, plugins: list[str], select: str, files: list[Path]) -> tuple[subprocess.CompletedProcess,
                                                                                            dict[str, str]]:
    """pytest in a subprocess with the plugins loaded; (the process, {test id: outcome}) from its JUnit XML."""
    junit = tmp_path / "junit.xml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), str(TESTS), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE", f"--junitxml={junit}",
           *(a for p in plugins for a in ("-p", p)), "-k", select, *map(str, files)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    outcomes = {}
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            kids = {child.tag for child in case}
            outcome = next((k for k in ("failure", "error", "skipped") if k in kids), "passed")
            outcomes[f"{case.get('classname')}::{case.get('name')}"] = outcome
    return proc, outcomes


@pytest.mark.processes
def test_recipe_scheme_passes_the_scheme_iterating_tests(tmp_path):
    files = scheme_test_files()
    select = " or ".join((SCHEME, *ITERATING_INSIDE))
    proc, outcomes = run_pytest(tmp_path, write_plugins(tmp_path), select, files)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    summary = re.search(r"(\d+) passed", out.strip().splitlines()[-1])
    assert summary, out[-3000:]
    mine = {test: o for test, o in outcomes.items() if f"[{SCHEME}" in test or f"-{SCHEME}" in test}
    assert all(o == "passed" for o in mine.values()), mine
    assert int(summary.group(1)) >= len(mine) >= MIN_SCHEME_TESTS, (summary.group(0), sorted(mine))
    for name, n in REQUIRED.items():
        ran = [t for t in mine if t.split("::")[-1].startswith(name + "[")]
        assert len(ran) >= n, f"{name} ran {len(ran)} times on {SCHEME}, expected {n}: {sorted(mine)}"
    for path in files:  # every module contributed its cases of the scheme
        assert any(t.split("::")[0].endswith(path.stem) for t in mine), f"{path.name} ran nothing on {SCHEME}"
    for name in ITERATING_INSIDE:
        assert any(t.split("::")[-1].startswith(name) and o == "passed" for t, o in outcomes.items()), name


@pytest.mark.processes
def test_recipe_entry_without_its_formula_asks_for_it(tmp_path):
    """The entry alone: the formula test fails and says what to write where."""
    norm_tests = next(p for p in scheme_test_files() if p.name == "test_norm_schemes.py")
    proc, outcomes = run_pytest(tmp_path, write_plugins(tmp_path, with_formula=False),
                                f"{SCHEME} and test_every_block_matches_formula", [norm_tests])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and list(outcomes.values()) == ["failure"], out[-3000:]
    assert scheme_formulas.no_formula(SCHEME) in out, out[-3000:]
    assert re.search(rf"no formula for {SCHEME}: write block {SCHEME} out by hand in \S*scheme_formulas\.py "
                     r"\(docs/ARCHITECTURE\.md, Recipe: add a norm scheme\)", out)


def test_every_scheme_iterating_test_module_is_run_or_excused():
    """A new test module that iterates over NORM_SCHEMES joins SCHEME_TEST_FILES (or NOT_RUN, with the reason)."""
    iterating = {p.name for p in REPO.glob("tests/**/test_*.py") if "NORM_SCHEMES" in p.read_text(encoding="utf-8")}
    assert iterating - set(NOT_RUN) == set(SCHEME_TEST_FILES)
