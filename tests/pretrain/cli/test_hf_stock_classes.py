"""ln_free, Qwen3-style and OLMo 2-style checkpoints through `pretrain export-hf` into stock transformers classes and
back: `pretrain eval` gives the checkpoint's loss through transformers, `train.init_from` of the export gives the
checkpoint's function (ln_free: its multipliers folded, base depth 0), and the trained ln_free model's activations at
the norm sites keep the linear norm's error far below 1e-5. The per-scheme export table of docs/interop.md is
generated from models/hf/choose.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers.train import REPO, TINY, train_env

from models.hf import LINEAR_EPS
from models.hf.linear_norm import relative_error_bound
from pretrain.cli import main
from pretrain.config import load_config
from pretrain.data.resolve import resolve_data_path
from pretrain.data.folders import read_meta
from pretrain.state.sources import load_weights, open_source, resolve_model

pytestmark = pytest.mark.processes  # starts subprocesses, ranks or training runs (tests/conftest.py: tiers)

DATA = "bundled:tinyshakespeare"
# name -> (training overrides, config.json model_type). ln_free trains 20 steps so that its activations are a trained
# model's; tiny has 8 blocks, so the default base depth 4 gives c_in = sqrt(1/2), c_out = 1/2, folded by the export.
RUNS = {
    "ln_free": (["train.steps=20", "model.norm_scheme=ln_free"], "llama"),
    "qwen3": (["train.steps=1", "model.qk_norm=head", "model.n_layers=2"], "qwen3"),
    "olmo2": (["train.steps=1", "model.norm_scheme=reordered", "model.qk_norm=full", "model.n_layers=2"], "olmo2"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    base = tmp_path_factory.mktemp("stock")
    procs = {}
    for name, (overrides, _) in RUNS.items():  # the three short runs side by side: one wall-clock wait
        cmd = [sys.executable, "-m", "pretrain", "train", os.path.join(REPO, "configs", "tiny.yaml"),
               f"run.dir={base / name}", *TINY, *overrides]
        procs[name] = subprocess.Popen(cmd, cwd=REPO, env=train_env(data_cache), stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, out[-4000:]
    return {name: str(base / name) for name in RUNS}


@pytest.fixture
def env_cache(monkeypatch, data_cache):
    monkeypatch.setenv("PRETRAIN_CACHE", data_cache)


def eval_json(capsys, path: str) -> dict:
    capsys.readouterr()
    assert main(["eval", "--checkpoint", path, "--data", DATA, "--seq-len", "64", "--tokens", "2048", "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def val_tokens(data_cache: str, n: int = 4, length: int = 64) -> torch.Tensor:
    folder = resolve_data_path(DATA, data_cache)
    ids = np.memmap(os.path.join(folder, "val.bin"), dtype=read_meta(folder)["dtype"], mode="r")
    return torch.from_numpy(np.array(ids[: n * length], dtype=np.int64)).view(n, length)


@pytest.mark.parametrize("name", list(RUNS))
def test_export_evaluates_and_initializes_like_the_checkpoint(runs, name, tmp_path, env_cache, data_cache,
                                                              single_thread, capsys):
    run, hf_dir = runs[name], str(tmp_path / "hf")
    assert main(["export-hf", "--checkpoint", run, "--out", hf_dir]) == 0
    assert json.load(open(os.path.join(hf_dir, "config.json")))["model_type"] == RUNS[name][1]

    ours, theirs = eval_json(capsys, run), eval_json(capsys, hf_dir)  # theirs: transformers' AutoModelForCausalLM
    assert theirs["hf_model_type"] == RUNS[name][1] and theirs["tokens"] == ours["tokens"] == 2048
    print(f"EVAL {name}: checkpoint {ours['loss']:.7f}, export {theirs['loss']:.7f}, "
          f"difference {abs(ours['loss'] - theirs['loss']):.1e}")
    assert theirs["loss"] == pytest.approx(ours["loss"], abs=1e-5)

    # train.init_from the export: the model keys and weights a run starting there gets (`pretrain train` calls these
    # two; tests/pretrain/state/test_resume_config.py runs the whole command from an HF directory)
    cfg = resolve_model(load_config(None, [f"train.init_from={hf_dir}", f"run.dir={tmp_path / 'child'}"]), None)
    source_cfg = open_source(run).model_config
    assert (cfg.model.norm_scheme, cfg.model.qk_norm) == (source_cfg.norm_scheme, source_cfg.qk_norm)
    assert cfg.model.ln_free_base_depth == (0 if name == "ln_free" else source_cfg.ln_free_base_depth)
    from models import Llama

    child = Llama(cfg.model).eval()
    child.load_state_dict(load_weights(cfg))
    x = val_tokens(data_cache)
    with torch.no_grad():
        a, b = open_source(run).build()(x), child(x)
    diff = (a - b).abs().max().item()
    print(f"INIT_FROM {name}: max abs logit difference {diff:.2e}, relative {diff / a.abs().max().item():.2e}")
    assert diff <= 1e-5 * a.abs().max().item()


def test_trained_ln_free_activations_keep_the_linear_norm_exact(runs, data_cache, single_thread):
    """Mean squares at every site the export puts a linear RMSNorm (each block's two inputs, the final one) of the
    trained ln_free model: first-order error mean(x^2) / (2 eps) far below 1e-5, and transformers' LlamaRMSNorm with
    the export's eps and gain returns these very activations in fp32 and bf16."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    model = open_source(runs["ln_free"]).build()
    seen: list[torch.Tensor] = []
    sites = [m for b in model.blocks for m in (b.attn_norm, b.mlp_norm)] + [model.final_norm]
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach())) for m in sites]
    with torch.no_grad():
        model(val_tokens(data_cache))
    for h in hooks:
        h.remove()
    mean_square = torch.stack([s.pow(2).mean(-1).max() for s in seen])
    worst = mean_square.max().item()
    print(f"LN_FREE mean(x^2) per token at the norm sites: max {worst:.3g}, min over sites of the max "
          f"{mean_square.min().item():.3g}; bound {relative_error_bound(worst):.1e}")
    assert relative_error_bound(worst) < 1e-7  # 100x margin on the 1e-5
    assert worst < 2.0**16  # and inside the range where fp32 rounds mean(x^2) + eps to eps
    for dtype in (torch.float32, torch.bfloat16):
        norm = LlamaRMSNorm(model.cfg.d_model, eps=LINEAR_EPS).to(dtype)
        with torch.no_grad():
            norm.weight.fill_(LINEAR_EPS ** 0.5)
            for s in seen:
                assert torch.equal(norm(s.to(dtype)), s.to(dtype))


@pytest.mark.parametrize("name", ["qwen3", "olmo2"])
def test_generate_and_remove_norms_take_the_stock_export(runs, name, tmp_path, env_cache, data_cache, capsys):
    """A Qwen3 or OLMo 2 export generates the checkpoint's greedy tokens, and `remove-norms` takes it (q/k norms,
    and OLMo 2's post-sublayer norms, removed): its ln_free result exports to a stock Llama."""
    run, hf_dir = runs[name], str(tmp_path / "hf")
    assert main(["export-hf", "--checkpoint", run, "--out", hf_dir]) == 0
    texts = []
    for path, what in ((run, "a pretrained model"), (hf_dir, "a Hugging Face directory")):
        for raw in (["--raw"], []):  # a base model continues the text plainly without being told
            capsys.readouterr()
            assert main(["generate", "--checkpoint", path, "--prompt", "ROMEO:", *raw, "--max-new-tokens", "12",
                         "--device", "cpu"]) == 0
            out = capsys.readouterr()
            texts.append(out.out)
            said = "--raw" if raw else f"{what}; --template NAME wraps the prompt as an instruction"
            assert out.err == f"generate: plain continuation ({said})\n"
    assert len(set(texts)) == 1 and texts[0]  # (a 1-step model: mostly newlines, the same ones)

    out = str(tmp_path / "removal")
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain", "remove-norms", "--checkpoint", hf_dir, "--data", DATA, "--out", out,
         "--steps", "12", *TINY, "removal.start=2", "removal.gap=1", "eval.interval=12", "logging.backends=[]"],
        cwd=REPO, env=train_env(data_cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.load(open(os.path.join(out, "removal.json")))
    sites = [s["site"] for s in report["schedule"]]
    assert any("q_norm" in s for s in sites) and any("k_norm" in s for s in sites), sites
    assert abs(report["ce_ln_free"] - report["ce_fixed_sigma"]) < 1e-5
    assert main(["export-hf", "--checkpoint", os.path.join(out, "ln_free"), "--out", str(tmp_path / "ln_free_hf")]) == 0
    assert json.load(open(tmp_path / "ln_free_hf" / "config.json"))["model_type"] == "llama"
