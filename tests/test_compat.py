"""Private DeepSpeed / megatron-core / torch / TensorBoard APIs live in pretrain/compat.py, behind a version check."""

from __future__ import annotations

import configparser
import os
import re
import subprocess

import pytest
from train_helpers import REPO

from pretrain import compat
from pretrain.errors import UserError


def test_installed_versions_are_the_tested_ones():
    compat.check_versions()  # what CI installs from setup.cfg passes


def test_untested_version_is_a_one_line_error_unless_allowed(monkeypatch):
    real = compat.metadata.version
    monkeypatch.setattr(compat.metadata, "version", lambda p: "0.21.0" if p == "deepspeed" else real(p))
    monkeypatch.delenv("NORMLAB_ALLOW_UNTESTED", raising=False)
    with pytest.raises(UserError) as e:
        compat.check_versions()
    assert "deepspeed 0.21.0 (tested: >=0.19,<0.20)" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv("NORMLAB_ALLOW_UNTESTED", "1")
    with pytest.warns(UserWarning, match="untested versions"):
        compat.check_versions()


def test_setup_cfg_pins_the_tested_ranges():
    parser = configparser.ConfigParser()
    parser.read(os.path.join(REPO, "setup.cfg"))
    requires = {re.split(r"[<>=]", line)[0]: line for line in parser["options"]["install_requires"].split() if line}
    for package, (low, high) in compat.TESTED.items():
        assert requires[package] == f"{package}>={low},<{high}", requires[package]


def test_private_apis_are_only_used_in_compat():
    # The internals compat.py wraps must not be reached for anywhere else.
    patterns = ["_take_model_step", "_compiled_call_impl", "_get_file_writer", "_hp_mapping", "optim_states.pt",
                "param_slice_mappings", "clip_grad ="]
    out = subprocess.run(["git", "grep", "-n", "--untracked", "-e", "|".join(patterns), "-E", "--", "pretrain", "models", "launch"],
                         cwd=REPO, capture_output=True, text=True).stdout
    offenders = [line for line in out.splitlines()
                 if not line.startswith("pretrain/compat.py") and not line.split(":", 2)[2].lstrip().startswith(("#", "*"))]
    assert not offenders, offenders
