"""The coordinate check (pretrain/analysis/coord_check.py, `pretrain coord-check`): after a few steps the mean
|coordinate| of the activations is flat against width under mup and completep and grows under standard, flat against
depth under completep and growing under standard (pre_ln, peri_ln).

Thresholds on the largest |log-log slope| at the last step (4 steps at lr 1e-2 on one batch, widths 32-128, depths
2-8): flat below FLAT (width) or DEPTH_FLAT (depth), growing above GROWING. Measured on this setting (slopes at the last step, largest over embedding,
attention, MLP, residual stream and logits): width, standard 1.9-2.7 against mup 0.15-0.52 (peri_ln's MLP output
before its output norm falls as width^-0.5: it is the largest); depth, standard 1.8 (pre_ln) and 1.0 (peri_ln)
against completep 0.08-0.23. ln_free under standard is already flat in depth (0.25): its default multipliers are
depth-µP (model.ln_free_base_depth); without them it grows. lns takes no completep (refused: its 1/√l is a depth
scaling) and under standard its depth slope is 0.44, neither flat nor growing by these thresholds.
"""

from __future__ import annotations

import json

import pytest
import torch

from pretrain.analysis.coord_check import slopes, sweep
from pretrain.cli import main
from pretrain.config import load_config

pytestmark = pytest.mark.usefixtures("single_thread")

FLAT, DEPTH_FLAT, GROWING = 0.6, 0.3, 0.8
WIDTHS, DEPTHS, STEPS = [32, 64, 128], [2, 4, 8], 4
SMALL = ["model.vocab_size=128", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=2",
         "model.ffn_hidden=96", "model.max_seq_len=32", "data.seq_len=16", "train.micro_batch_size=4",
         "train.global_batch_size=4", "train.lr=1e-2"]


def _largest_slope(axis: str, sizes: list[int], *overrides: str) -> float:
    cfg = load_config(None, [*SMALL, *overrides])
    return max(abs(s) for s in slopes(sweep(cfg, axis, sizes, STEPS, torch.device("cpu"))).values())


@pytest.mark.parametrize("scheme", ["pre_ln", "lns", "ln_free", "peri_ln"])
@pytest.mark.parametrize("parametrization", ["standard", "mup"])
def test_width(scheme, parametrization):
    slope = _largest_slope("width", WIDTHS, f"model.norm_scheme={scheme}", f"model.parametrization={parametrization}")
    if parametrization == "standard":
        assert slope > GROWING, f"{scheme} under standard: largest width slope {slope:.2f}"
    else:
        assert slope < FLAT, f"{scheme} under mup: largest width slope {slope:.2f}"


@pytest.mark.parametrize("scheme, parametrization, growing", [
    ("pre_ln", "standard", True), ("pre_ln", "completep", False),
    ("peri_ln", "standard", True), ("peri_ln", "completep", False),
    ("ln_free", "completep", False),
    ("ln_free", "standard", False),  # its default depth-µP multipliers
])
def test_depth(scheme, parametrization, growing):
    extra = ["model.ln_free_base_depth=0"] if (scheme, parametrization) == ("ln_free", "completep") else []
    slope = _largest_slope("depth", DEPTHS, f"model.norm_scheme={scheme}", f"model.parametrization={parametrization}",
                           *extra)
    if growing:
        assert slope > GROWING, f"{scheme} under {parametrization}: largest depth slope {slope:.2f}"
    else:
        assert slope < DEPTH_FLAT, f"{scheme} under {parametrization}: largest depth slope {slope:.2f}"


def test_the_command_writes_its_json_and_figure(tmp_path, capsys):
    out = tmp_path / "cc"
    code = main(["coord-check", "configs/tiny.yaml", *SMALL, "model.parametrization=completep", "--widths", "32,64",
                 "--depths", "1,2", "--steps", "1", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "coord_check.json").read_text())
    assert (out / "coord_check.png").stat().st_size > 0
    assert set(result["width"]) == {"32", "64"} and set(result["depth"]) == {"1", "2"}
    for name in ("embedding", "block1.attn", "block1.mlp", "block1.residual", "logits", "attn", "residual"):
        assert len(result["width"]["32"][name]) == 2  # steps 0 and 1
    assert "block2.attn" in result["depth"]["2"]
    assert result["max_abs_slope_width"] == max(abs(s) for s in result["slopes_width"].values())
    assert result["max_abs_slope_depth"] == max(abs(s) for s in result["slopes_depth"].values())
    assert result["base"] == {"base_d_model": 32, "base_n_layers": 2}
    assert result["multipliers"]["hidden"] == {"init": 1.0, "lr": 1.0, "weight_decay": 1.0, "eps": 1.0}  # the base
    assert "coord_check.json" in capsys.readouterr().out


@pytest.mark.parametrize("flags, words", [(["--widths", "64"], "at least two"), (["--depths", "2,x"], "integers"),
                                          (["--widths", "40,64"], "multiple of the head dim")])
def test_bad_sizes_are_one_line_errors(tmp_path, capsys, flags, words):
    code = main(["coord-check", "configs/tiny.yaml", *SMALL, *flags, "--steps", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and words in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
