"""Norm removal by fine-tuning (`pretrain remove-norms`, pretrain/removal/) and exact logit attribution.

Unit tests pin the removable norms (live = the plain norm, fixed = a constant scale, position 0 left out of its
statistic; per-head and full-width q/k norms), the schedule and the fold (the frozen-sigma model and the folded
ln_free model give the same logits within 1e-5, for input norms, q/k norms folded into qkv's rows before RoPE and
reordered's output norms folded into o/down). One real end-to-end run (tiny, 2 layers) removes every norm with a
control, checks the log, the metrics, removal.json and the ln_free checkpoint (loads, same logits, init_from,
attribution); a second run stopped mid-schedule and resumed on another layout gives the uninterrupted run's losses
and sigmas; a third, with per-head q/k norms, gives the same losses and per-head sigmas on TP = 2 as on one rank.
The taper route (--method taper) runs end to end on the same source (gate, calibration, fold, export) and resumes
in the middle of its taper bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers.train import REPO, metrics, train_env

from models.config import ModelConfig
from models.llama import Llama
from models.norm_layers import LayerNorm, RemovableLayerNorm, RemovableNorm, RemovableRMSNorm, RMSNorm
from pretrain.config import RemovalConfig, load_config
from pretrain.errors import UserError
from pretrain.removal.hooks import fold_norms, schedule

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.compat]
SMALL = dict(vocab_size=64, d_model=16, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=32, max_seq_len=32)


# ---------------------------------------------------------------------------------------------------------
# The removable norm


@pytest.mark.parametrize("plain,removable", [(RMSNorm, RemovableRMSNorm), (LayerNorm, RemovableLayerNorm)])
def test_removable_norm_live_fixed_and_statistic(plain, removable):
    gen = torch.Generator().manual_seed(0)
    a, b = plain(16, 1e-6, output_scale=0.5), removable(16, 1e-6, output_scale=0.5)
    with torch.no_grad():
        a.weight.copy_(1 + 0.3 * torch.randn(16, generator=gen))
        b.weight.copy_(a.weight)
    x = 3 * torch.randn(2, 5, 16, generator=gen) + 0.7
    assert torch.equal(a(x), b(x))  # live: the norm itself
    b.tracking = True
    b.train()
    spiked = x.clone()
    spiked[:, 0] *= 100.0  # position 0 does not enter the statistic
    b(spiked)
    total, count = b.take_statistic().flatten().tolist()
    x32 = x[:, 1:] - (x[:, 1:].mean(-1, keepdim=True) if b.centred else 0)
    want = x32.pow(2).mean(-1).add(1e-6).sqrt().mean().item()
    assert count == 2 * 4 and total / count == pytest.approx(want, rel=1e-6)
    assert b.take_statistic().flatten().tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="before its sigma was measured"):
        b.set_fixed(True)
    b.sigma.fill_(2.5)
    b.set_fixed(True)
    centred = x - x.mean(-1, keepdim=True) if b.centred else x
    torch.testing.assert_close(b(x), centred / 2.5 * b.weight * 0.5, rtol=1e-6, atol=1e-6)
    b(x)
    assert b.take_statistic().flatten().tolist() == [0.0, 0.0]  # a fixed site measures nothing
    state = b.state_dict()
    assert set(state) == {"weight", "sigma", "fixed"}
    c = removable(16, 1e-6, output_scale=0.5)
    c.load_state_dict(state)
    assert c.is_fixed and torch.equal(c(x), b(x))
    assert c.bfloat16().sigma.dtype == torch.float32  # a statistic stays float32 in a bf16 model


@pytest.mark.parametrize("centred", [False, True], ids=["rmsnorm", "layernorm"])
def test_removable_qk_norms_per_head_and_full_width(centred):
    """q/k norms (x [B, T, heads, E]): live = the plain norm; a per-head norm measures one statistic per head
    (position 0 left out), a full-width one over all heads; fixed, each divides by its frozen sigma(s)."""
    from models.parallel import HeadNorm, WidthNorm
    from models.norm_layers import RemovableHeadNorm, RemovableWidthNorm

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 8, generator=gen) * torch.tensor([0.5, 2.0, 7.0]).view(3, 1) + 0.3
    x_spiked = x.clone()
    x_spiked[:, 0] *= 100.0
    head, whole = RemovableHeadNorm(8, 1e-6, centred, None, heads=3), RemovableWidthNorm(24, 1e-6, centred, None)
    with torch.no_grad():
        head.weight.copy_(1 + 0.3 * torch.randn(8, generator=gen))
        whole.weight.copy_(1 + 0.3 * torch.randn(24, generator=gen))
    plain_head, plain_whole = HeadNorm(8, 1e-6, centred, None), WidthNorm(24, 1e-6, centred, None)
    plain_head.load_state_dict({"weight": head.weight})
    plain_whole.load_state_dict({"weight": whole.weight})
    assert torch.equal(head(x), plain_head(x)) and torch.equal(whole(x), plain_whole(x))
    for m in (head, whole):
        m.tracking = True
        m.train()
        m(x_spiked)
    rest = x[:, 1:]
    per_head = rest - rest.mean(-1, keepdim=True) if centred else rest
    flat = rest.flatten(-2)
    flat = flat - flat.mean(-1, keepdim=True) if centred else flat
    total, count = head.take_statistic()
    assert count.tolist() == [8.0] * 3
    torch.testing.assert_close(total / count, per_head.pow(2).mean(-1).add(1e-6).sqrt().mean((0, 1)).double())
    total, count = whole.take_statistic()
    assert count.tolist() == [8.0] and (total / count).item() == pytest.approx(
        flat.pow(2).mean(-1).add(1e-6).sqrt().mean().item(), rel=1e-6)
    head.sigma.copy_(torch.tensor([0.4, 1.9, 6.5]))
    head.set_fixed(True)
    whole.sigma.fill_(3.0)
    whole.set_fixed(True)
    centred_head = x - x.mean(-1, keepdim=True) if centred else x
    torch.testing.assert_close(head(x), centred_head / head.sigma.view(3, 1) * head.weight)
    centred_flat = x.flatten(-2) - x.flatten(-2).mean(-1, keepdim=True) if centred else x.flatten(-2)
    torch.testing.assert_close(whole(x), (centred_flat / 3.0 * whole.weight).view_as(x))


# ---------------------------------------------------------------------------------------------------------
# Schedule and config


def test_schedule_switches_sites_in_the_stated_order_at_the_stated_steps():
    cfg = ModelConfig(**SMALL, removable_norms=True)
    got = [(s.name, s.step) for s in schedule(cfg, RemovalConfig(start=5, gap=2))]
    assert got == [("blocks.0.mlp_norm", 5), ("blocks.1.mlp_norm", 7), ("blocks.2.mlp_norm", 9),
                   ("blocks.0.attn_norm", 11), ("blocks.1.attn_norm", 13), ("blocks.2.attn_norm", 15),
                   ("final_norm", 17)]
    got = [(s.name, s.step) for s in schedule(cfg, RemovalConfig(order=["attn", "final", "mlp"], start=2, gap=0))]
    assert [n for n, _ in got] == [f"blocks.{i}.attn_norm" for i in range(3)] + ["final_norm"] + \
        [f"blocks.{i}.mlp_norm" for i in range(3)]
    assert {s for _, s in got} == {2}


@pytest.mark.parametrize("overrides,message", [
    (["removal.order=[mlp,attn]"], "removal.order: ['mlp', 'attn'] must name each of mlp, attn, qk, final once"),
    (["removal.order=[mlp,attn,final,norms]"], "removal.order"),
    (["model.removable_norms=true", "model.qk_norm=head", "removal.order=[mlp,attn,final]"],
     "leaves out qk, where this model has norms"),
    (["model.removable_norms=true", "model.qk_norm=head", "train.steps=60"], "switches its last site at step 84"),
    (["model.removable_norms=true", "model.attn_gate=headwise"], "does not cover the attention gate"),
    (["removal.order=[mlp,attn,attn]"], "removal.order"),
    (["removal.start=1"], "removal.start: must be >= 2"),
    (["removal.ema=1"], "removal.ema: must be below 1"),
    (["model.removable_norms=true", "train.steps=30"], "switches its last site at step 52"),
    (["model.removable_norms=true", "model.norm_scheme=post_ln"], "norm removal works on pre_ln, lns and reordered"),
    (["model.removable_norms=true", "eval.interval=0"], "eval.interval=0: a norm-removal run"),
])
def test_removal_config_errors_are_one_line(overrides, message):
    with pytest.raises(UserError) as e:
        load_config(None, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# Folding


def _fixed_model(seed: int = 0, **overrides) -> tuple[ModelConfig, Llama]:
    """A float32 removal model with gains off 1, every site fixed in turn at the sigma measured on a random batch with
    the sites before it fixed (as the schedule does: measured all at once, the sigmas of a reordered model's later sites
    would not match their fixed inputs and its logits grow into the thousands, where float32 itself errs by 1e-2)."""
    cfg = ModelConfig(**{**SMALL, "removable_norms": True, "init_std": 0.05, **overrides})
    model = Llama(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    sites = [m for m in model.modules() if isinstance(m, RemovableNorm)]
    tokens = torch.randint(cfg.vocab_size, (4, 16), generator=gen)
    with torch.no_grad():
        for module in sites:
            module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=gen))
            module.tracking = True
        for module in sites:
            for other in sites:
                other.take_statistic()  # drop what the last forward recorded
            model(tokens)
            total, count = module.take_statistic()
            module.sigma.copy_(total / count)
            module.set_fixed(True)
    return cfg, model


FOLD_CASES = {
    "pre_ln": {}, "lns": {"norm_scheme": "lns"}, "tied": {"tie_embeddings": True}, "layernorm": {"norm_type": "layernorm"},
    "lns-zero_centered": {"norm_scheme": "lns", "norm_gain": "zero_centered"},
    "pre_ln-qk_head": {"qk_norm": "head"}, "pre_ln-qk_full": {"qk_norm": "full"},
    "lns-qk_head": {"norm_scheme": "lns", "qk_norm": "head", "tie_embeddings": True},
    "reordered-qk_full": {"norm_scheme": "reordered", "qk_norm": "full"},
    "reordered": {"norm_scheme": "reordered", "norm_gain": "zero_centered"},
    "reordered-layernorm-qk_head": {"norm_scheme": "reordered", "norm_type": "layernorm", "qk_norm": "head"},
    "pre_ln-layernorm-qk_full": {"norm_type": "layernorm", "qk_norm": "full"},
    "gqa4-qk_head": {"n_heads": 8, "n_kv_heads": 2, "d_model": 32, "qk_norm": "head"},  # 4 q heads per kv head
    "mha-qk_full": {"n_kv_heads": 4, "qk_norm": "full"},
}


@pytest.mark.parametrize("overrides", list(FOLD_CASES.values()), ids=list(FOLD_CASES))
def test_fold_is_exact(overrides):
    """The frozen-sigma model and the folded ln_free model give the same logits within 1e-5 (float32)."""
    cfg, model = _fixed_model(**overrides)
    ln_cfg, folded = fold_norms(cfg, model.state_dict())
    assert ln_cfg.norm_scheme == "ln_free" and not ln_cfg.tie_embeddings and not ln_cfg.removable_norms
    ln = Llama(ln_cfg)
    ln.load_state_dict(folded, strict=True)
    assert not any("norm" in name for name in ln.state_dict())
    tokens = torch.randint(cfg.vocab_size, (3, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want, got = model(tokens), ln(tokens)
    assert (got - want).abs().max().item() < 1e-5 and want.abs().max() > 1.0
    if cfg.tie_embeddings:
        assert torch.equal(folded["tok_emb.weight"], model.tok_emb.weight)  # the input embedding is untouched


def test_fold_refuses_a_live_site():
    cfg, model = _fixed_model()
    model.blocks[1].attn_norm.set_fixed(False)
    with pytest.raises(UserError, match="cannot fold blocks.1.attn_norm"):
        fold_norms(cfg, model.state_dict())


def test_attribution_parts_sum_to_the_logit():
    from pretrain.analysis.attribution import logit_attribution

    cfg, model = _fixed_model()
    ln_cfg, folded = fold_norms(cfg, model.state_dict())
    ln = Llama(ln_cfg)
    ln.load_state_dict(folded)
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randint(64, (2, 16), generator=gen), torch.randint(64, (2, 16), generator=gen)) for _ in range(2)]
    result = logit_attribution(ln, batches)
    assert result["max_abs_error"] < 1e-4 and result["tokens"] == 64
    total = result["embedding"] + sum(result["attn"]) + sum(result["mlp"])
    assert total == pytest.approx(result["logit"], abs=1e-4) and abs(result["logit"]) > 1e-2
    with pytest.raises(UserError, match="exact only without norms"):
        logit_attribution(model, batches)


# ---------------------------------------------------------------------------------------------------------
# End to end


FAST = ["data.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=4", "eval.tokens=512",
        "logging.interval=1", "logging.progress_bar=false", "logging.backends=[]", "checkpoint.interval=0"]
REMOVAL = ["--steps", "10", "removal.start=2", "removal.gap=1", "eval.interval=5", *FAST]


def _pretrain(*args: str, cache_dir: str, expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pretrain", *args], cwd=REPO, env=train_env(cache_dir),
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != expect:
        raise AssertionError(f"pretrain {args[0]} exited {proc.returncode}, expected {expect}\n--- stdout\n"
                             f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def source(tmp_path_factory, data_cache):
    run = str(tmp_path_factory.mktemp("source"))
    _pretrain("train", os.path.join(REPO, "configs", "tiny.yaml"), f"run.dir={run}", "model.n_layers=2",
              "train.steps=6", "train.warmup_steps=2", "eval.interval=0", *FAST, cache_dir=data_cache)
    return run


def _state(folder):
    from pretrain.state.checkpoint import find_checkpoint, load_model_state

    return load_model_state(find_checkpoint(folder))


def _removal_args(source: str, out: str) -> list[str]:
    return ["remove-norms", "--checkpoint", source, "--data", "bundled:tinyshakespeare", "--out", out, *REMOVAL]


@pytest.fixture(scope="module")
def removal(source, tmp_path_factory, data_cache):
    """The real run: every norm of the 2-layer source removed in 10 steps (sites at steps 2..6), with a control."""
    run = str(tmp_path_factory.mktemp("removal") / "run")
    args = _removal_args(source, run)
    return run, _pretrain(*args[:-len(REMOVAL)], "--control", *REMOVAL, cache_dir=data_cache)


@pytest.mark.processes
def test_remove_norms_end_to_end(removal, source, tmp_path):
    run, proc = removal
    last = proc.stdout.strip().splitlines()[-1]
    report = json.load(open(os.path.join(run, "removal.json")))
    assert last.startswith("removal: ce_original ") and "| ce_control " in last and "| ce_ln_free " in last
    for key in ("ce_original", "ce_control", "ce_ln_free"):
        assert math.isfinite(report[key]) and f"{key} {report[key]:.4f}" in last
    assert report["gap_vs_control"] == pytest.approx(report["ce_ln_free"] - report["ce_control"])
    assert abs(report["ce_ln_free"] - report["ce_fixed_sigma"]) < 1e-5  # the fold changes nothing
    # The schedule: 2 mlp, 2 attn, the final norm at steps 2..6, in order, logged and in metrics.jsonl.
    sites = ["blocks.0.mlp_norm", "blocks.1.mlp_norm", "blocks.0.attn_norm", "blocks.1.attn_norm", "final_norm"]
    records = metrics(run)
    switches = [(r["step"], r["removed"]) for r in records if "removed" in r]
    assert switches == list(zip(range(2, 7), sites))
    assert [s["site"] for s in report["schedule"]] == sites and all(s["sigma"] > 0 for s in report["schedule"])
    removed = {r["step"]: r["sites_removed"] for r in records if "loss" in r}
    assert removed == {s: min(max(s - 1, 0), 5) for s in range(1, 11)}
    assert [r["step"] for r in records if "val_loss" in r] == [0, 5, 10]
    assert all(r["val_bpb"] > 0 for r in records if "val_loss" in r)  # the source's at step 0 included
    assert "removal: blocks.1.attn_norm fixed" in proc.stdout
    # The control: the same fine-tune (same data and lr schedule) with its norms.
    control = {r["step"]: r for r in metrics(os.path.join(run, "control")) if "loss" in r}
    train = {r["step"]: r for r in records if "loss" in r}
    assert [r["lr"] for r in control.values()] == [r["lr"] for r in train.values()]
    assert control[1]["loss"] == pytest.approx(train[1]["loss"], rel=1e-6)  # step 1: no site fixed yet
    # The result: an ordinary ln_free checkpoint with the frozen model's logits.
    frozen_cfg, frozen = _state(os.path.join(run, "checkpoints"))
    ln_cfg, ln = _state(os.path.join(run, "ln_free"))
    assert ln_cfg.model.norm_scheme == "ln_free" and not any("norm" in k for k in ln)
    a, b = Llama(frozen_cfg.model), Llama(ln_cfg.model)
    a.load_state_dict(frozen)
    b.load_state_dict(ln)
    a, b = a.double(), b.double()  # the fold's only error is storing float32 weights
    tokens = torch.randint(ln_cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (a(tokens) - b(tokens)).abs().max().item() < 1e-5
    # train.init_from takes it (weights checked against an ln_free model of its shape)
    from pretrain.state.sources import load_weights, resolve_model

    cfg = resolve_model(load_config(None, [f"train.init_from={run}/ln_free", f"run.dir={tmp_path}/next"]), None)
    assert cfg.model.norm_scheme == "ln_free" and set(load_weights(cfg)) == set(ln)
    # exact attribution on it, and the refusal for a model with norms
    from pretrain.cli import main

    assert main(["attribute", "--checkpoint", f"{run}/ln_free", "--data", "bundled:tinyshakespeare", "--out",
                 str(tmp_path / "attr"), "--batches", "2"]) == 0
    result = json.load(open(tmp_path / "attr" / "attribution.json"))
    assert result["max_abs_error"] < 1e-4 and len(result["attn"]) == 2
    assert main(["attribute", "--checkpoint", source, "--data", "bundled:tinyshakespeare", "--out",
                 str(tmp_path / "attr2")]) == 2
    assert not os.path.exists(tmp_path / "attr2")


@pytest.mark.processes
def test_remove_norms_resumes_mid_schedule_on_another_layout(removal, source, tmp_path, data_cache):
    """Stopped after step 3 (two sites fixed, three live with their EMAs) and resumed at ZeRO-1 (the full-state
    path), the run gives the losses, sigmas and result of the uninterrupted one."""
    whole, parts = removal[0], str(tmp_path / "parts")
    stopped = _pretrain(*_removal_args(source, parts), "train.stop_at_step=3", cache_dir=data_cache)
    assert "stopped before the end" in stopped.stdout and not os.path.exists(os.path.join(parts, "removal.json"))
    resumed = _pretrain(*_removal_args(source, parts), "parallel.zero_stage=1", cache_dir=data_cache)
    assert "resume: parallel.zero_stage 0 -> 1" in resumed.stdout
    a = {r["step"]: r for r in metrics(whole) if "loss" in r}
    b = {r["step"]: r for r in metrics(parts) if "loss" in r}
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5), step
    sig_a = [s["sigma"] for s in json.load(open(os.path.join(whole, "removal.json")))["schedule"]]
    sig_b = [s["sigma"] for s in json.load(open(os.path.join(parts, "removal.json")))["schedule"]]
    assert sig_b == pytest.approx(sig_a, rel=1e-5)
    ce_a, ce_b = (json.load(open(os.path.join(r, "removal.json")))["ce_ln_free"] for r in (whole, parts))
    assert ce_b == pytest.approx(ce_a, rel=1e-5)


@pytest.mark.processes
def test_remove_norms_with_per_head_qk_norms_on_tensor_parallel(tmp_path, data_cache):
    """A Qwen3-shaped source (pre_ln, per-head q/k norms, 4 q heads on 2 kv heads): the q/k sites come after the
    attention group with one sigma per head, and the removal on TP = 2 (each rank holds half the heads, whose
    statistics it contributes) gives the losses, per-head sigmas and folded result of the run on one process."""
    source = str(tmp_path / "source")
    model = ["model.n_layers=2", "model.qk_norm=head"]
    _pretrain("train", os.path.join(REPO, "configs", "tiny.yaml"), f"run.dir={source}", *model, "train.steps=6",
              "train.warmup_steps=2", "eval.interval=0", *FAST, cache_dir=data_cache)
    single, split = str(tmp_path / "single"), str(tmp_path / "tp2")
    _pretrain(*_removal_args(source, single), cache_dir=data_cache)
    args = _removal_args(source, split)
    _pretrain(*args[:-len(REMOVAL)], "--nproc-per-node", "2", *REMOVAL, "parallel.tp=2", cache_dir=data_cache)
    a, b = metrics(single), metrics(split)
    switches = [r for r in a if "removed" in r]
    assert [r["removed"] for r in switches] == [
        "blocks.0.mlp_norm", "blocks.1.mlp_norm", "blocks.0.attn_norm", "blocks.1.attn_norm", "blocks.0.attn.q_norm",
        "blocks.0.attn.k_norm", "blocks.1.attn.q_norm", "blocks.1.attn.k_norm", "final_norm"]
    heads = {r["removed"]: r.get("sigma_heads") for r in switches}
    assert len(heads["blocks.1.attn.q_norm"]) == 4 and len(heads["blocks.1.attn.k_norm"]) == 2
    assert heads["final_norm"] is None and max(heads["blocks.0.attn.q_norm"]) > min(heads["blocks.0.attn.q_norm"])
    for r, s in zip(switches, [r for r in b if "removed" in r]):
        assert s["removed"] == r["removed"] and s["sigma"] == pytest.approx(r["sigma"], rel=1e-4)
        assert s.get("sigma_heads") == (None if r.get("sigma_heads") is None else pytest.approx(r["sigma_heads"], rel=1e-4))
    losses = [({r["step"]: r["loss"] for r in m if "loss" in r}) for m in (a, b)]
    assert sorted(losses[0]) == list(range(1, 11))
    for step, loss in losses[0].items():
        assert losses[1][step] == pytest.approx(loss, rel=1e-4), step
    ce = [[r["ce_ln_free"] for r in m if "ce_ln_free" in r][-1] for m in (a, b)]
    assert ce[1] == pytest.approx(ce[0], rel=1e-5)
    assert ce[0] == pytest.approx([r["val_loss"] for r in a if r.get("step") == 10 and "val_loss" in r][-1], abs=1e-5)
    ln_cfg, ln = _state(os.path.join(split, "ln_free"))
    assert ln_cfg.model.norm_scheme == "ln_free" and ln_cfg.model.qk_norm == "none" and not any("norm" in k for k in ln)


# ---------------------------------------------------------------------------------------------------------
# The taper route (--method taper; the formula, schedule and fold by hand: test_taper.py)


TAPER = ["--method", "taper", "--steps", "8", "removal.start=2", "removal.taper_steps=4", "removal.scale_loss=0.01",
         "eval.interval=4", *FAST]


def _taper_args(source: str, out: str) -> list[str]:
    return ["remove-norms", "--checkpoint", source, "--data", "bundled:tinyshakespeare", "--out", out, *TAPER]


@pytest.fixture(scope="module")
def taper(source, tmp_path_factory, data_cache):
    """Every norm of the 2-layer source tapered: calibrated before step 2, gate 0 from step 5, folded at step 8; the
    final norm anchored by the scale loss from step 2 on."""
    run = str(tmp_path_factory.mktemp("taper") / "run")
    return run, _pretrain(*_taper_args(source, run), cache_dir=data_cache)


@pytest.mark.processes
def test_remove_norms_taper_end_to_end(taper, tmp_path):
    from pretrain.removal.schedule import taper_gate

    run, proc = taper
    last = proc.stdout.strip().splitlines()[-1]
    report = json.load(open(os.path.join(run, "removal.json")))
    assert last.startswith("removal (taper): ce_original ") and report["method"] == "taper"
    assert report["taper_end"] == 5 and "removal: taper started, 5 sites calibrated" in proc.stdout
    sites = ["blocks.0.mlp_norm", "blocks.1.mlp_norm", "blocks.0.attn_norm", "blocks.1.attn_norm", "final_norm"]
    assert [(s["step"], s["site"]) for s in report["schedule"]] == [(2, s) for s in sites]
    assert all(s["c"] > 0 and s["c"] == pytest.approx(1 / s["sigma"]) for s in report["schedule"])
    train = {r["step"]: r for r in metrics(run) if "loss" in r}
    removal = RemovalConfig(start=2, taper_steps=4)
    assert {s: r["taper_gate"] for s, r in train.items()} == {s: taper_gate(removal, s) for s in range(1, 9)}
    assert {s: r["sites_removed"] for s, r in train.items()} == {s: 0 if s < 5 else 5 for s in range(1, 9)}
    assert abs(report["ce_ln_free"] - report["ce_fixed_sigma"]) < 1e-5  # the fold changes nothing
    # the folded result: an ln_free checkpoint with the g = 0 model's logits, exported as a stock Llama
    frozen_cfg, frozen = _state(os.path.join(run, "checkpoints"))
    ln_cfg, ln = _state(os.path.join(run, "ln_free"))
    assert ln_cfg.model.norm_scheme == "ln_free" and not ln_cfg.model.taper_norms and not any("norm" in k for k in ln)
    a, b = Llama(frozen_cfg.model), Llama(ln_cfg.model)
    a.load_state_dict(frozen)
    b.load_state_dict(ln)
    assert a.final_norm.is_fixed and a.final_norm.gate_value == 0.0
    tokens = torch.randint(ln_cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (a.double()(tokens) - b.double()(tokens)).abs().max().item() < 1e-5
    from pretrain.cli import main

    assert main(["export-hf", "--checkpoint", f"{run}/ln_free", "--out", str(tmp_path / "hf")]) == 0
    assert json.load(open(tmp_path / "hf" / "config.json"))["model_type"] == "llama"


@pytest.mark.processes
def test_remove_norms_taper_resumes_mid_taper_on_another_layout(taper, source, tmp_path, data_cache):
    """Stopped after step 3 (gate 1/2: calibrated, both branches live) and resumed at ZeRO-1 (the full-state path,
    which writes the buffers directly), the taper gives the uninterrupted run's losses, c's and folded result: gate,
    c, its EMAs and gamma~ are model state, and the calibration is not repeated."""
    whole, parts = taper[0], str(tmp_path / "parts")
    stopped = _pretrain(*_taper_args(source, parts), "train.stop_at_step=3", cache_dir=data_cache)
    assert "stopped before the end" in stopped.stdout
    resumed = _pretrain(*_taper_args(source, parts), "parallel.zero_stage=1", cache_dir=data_cache)
    assert "resume: parallel.zero_stage 0 -> 1" in resumed.stdout
    a = {r["step"]: r["loss"] for r in metrics(whole) if "loss" in r}
    b = {r["step"]: r["loss"] for r in metrics(parts) if "loss" in r}
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    ra, rb = (json.load(open(os.path.join(r, "removal.json"))) for r in (whole, parts))
    assert [s["c"] for s in rb["schedule"]] == [s["c"] for s in ra["schedule"]]
    assert rb["ce_ln_free"] == pytest.approx(ra["ce_ln_free"], rel=1e-5)
