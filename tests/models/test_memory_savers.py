"""The fused loss (train.fused_loss) and activation checkpointing (train.activation_checkpointing) change what a
training step holds, never what it computes: the loss and every gradient equal the plain model's, the diagnostics
see each block once, and the step's peak memory falls (measured in fresh interpreters by benchmarks/bench_memory.py's
child, the process's peak RSS). TP = 2 is checked in tests/models/test_tensor_parallel.py, the layouts end to end in
tests/pretrain/train/test_train_parallel.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import models.llama
import models.parallel
from helpers.train import REPO
from models.config import ModelConfig
from models.llama import Llama, document_mask, recompute
from pretrain.diagnostics.taps import BlockTaps

SHAPE = dict(vocab_size=96, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=32,
             init_std=0.1)
SCHEMES = [dict(norm_scheme="pre_ln"), dict(norm_scheme="ngpt", tie_embeddings=False),
           dict(norm_scheme="deepnorm", gpas=True), dict(norm_scheme="hybridnorm"),
           dict(norm_scheme="lns", qk_norm="full", attn_gate="elementwise"), dict(norm_scheme="pre_ln", tie_embeddings=True)]


def scheme_id(case: dict) -> str:
    return "-".join(str(v) for v in case.values())


def batch(cfg: ModelConfig, packed: bool = False):
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(cfg.vocab_size, (2, 24), generator=gen)
    labels = torch.randint(cfg.vocab_size, (2, 24), generator=gen)
    labels[0, :5] = -100  # ignored positions count in neither the sum nor the mean
    kwargs = {}
    if packed:  # two examples per row: the explicit-mask attention path
        doc_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 17 + [1] * 7])
        kwargs = dict(doc_ids=doc_ids, positions=torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1))
        kwargs["positions"][1] = torch.cat([torch.arange(17), torch.arange(7)])
    return tokens, labels, kwargs


def loss_and_grads(model, tokens, labels, reduction="mean", **kwargs):
    model.zero_grad(set_to_none=True)
    loss = model(tokens, labels, reduction=reduction, **kwargs)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def assert_same(got, ref, rtol: float, what: str, exact=None) -> None:
    """Loss and every gradient of `got` within `rtol` (relative) of `ref`'s; with `exact` (float64 results), a
    gradient that is a near-cancelling sum (GPAS's gate, summed over every position) may instead be no further from
    float64 than 4 times `ref`'s own distance: the order of the sum is all that differs."""
    (loss, grads), (loss_ref, grads_ref) = got, ref
    torch.testing.assert_close(loss, loss_ref, rtol=rtol, atol=0, msg=f"{what}: loss")
    for name, g in grads_ref.items():
        err = (grads[name].double() - g.double()).norm() / g.double().norm().clamp(min=1e-30)
        if err > rtol and exact is not None:
            g64 = exact[1][name]
            ours, theirs = ((t.double() - g64).norm() / g64.norm() for t in (grads[name], g))
            assert ours <= 4 * theirs, f"{what}: grad of {name} is {ours:.3g} from float64, unfused {theirs:.3g}"
            continue
        assert err <= rtol, f"{what}: grad of {name} differs by {err:.3g} (relative) > {rtol:g}"


@pytest.mark.parametrize("case", SCHEMES, ids=scheme_id)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_loss_equals_the_unfused_loss_and_gradients(case, reduction, monkeypatch):
    """In several chunks (7 tokens each here): fp32 within 1e-6 relative, loss and every gradient."""
    monkeypatch.setattr(models.parallel, "LOSS_CHUNK_ELEMENTS", 7 * SHAPE["vocab_size"])
    cfg = ModelConfig(**{**SHAPE, **case})
    model = Llama(cfg, seed=0)
    tokens, labels, _ = batch(cfg)
    recompute(model, fused_loss=False)
    unfused = loss_and_grads(model, tokens, labels, reduction)
    exact = loss_and_grads(Llama(cfg, seed=0).double(), tokens, labels, reduction)
    recompute(model, fused_loss=True)
    assert_same(loss_and_grads(model, tokens, labels, reduction), unfused, 1e-6, "fp32 fused", exact)


def test_fused_loss_in_bf16_is_within_its_rounding(monkeypatch):
    monkeypatch.setattr(models.parallel, "LOSS_CHUNK_ELEMENTS", 7 * SHAPE["vocab_size"])
    cfg = ModelConfig(**SHAPE)
    model = Llama(cfg, seed=0).to(torch.bfloat16)
    tokens, labels, _ = batch(cfg)
    recompute(model, fused_loss=False)
    unfused = loss_and_grads(model, tokens, labels)
    recompute(model, fused_loss=True)
    assert_same(loss_and_grads(model, tokens, labels), unfused, 2 ** -7, "bf16 fused")  # bf16: 8 significant bits


@pytest.mark.parametrize("case", [dict(norm_scheme="pre_ln"), dict(norm_scheme="lns", tie_embeddings=True),
                                  dict(norm_scheme="ngpt", tie_embeddings=False)], ids=scheme_id)
def test_liger_routing(case, monkeypatch):
    """recompute(liger=True) (a GPU with liger-kernel) hands a whole head's training loss to Liger's kernel with
    the head's weight (the embedding's when tied) and the reduction, keeps ngpt's scaled head chunked, and
    evaluates (no grad) chunked. Liger is CUDA-only: its call is stood in for by the plain loss of x W^T."""
    calls = []

    def liger_stand_in(x, weight, labels, reduction="mean"):
        calls.append(weight)
        return models.parallel.cross_entropy(torch.nn.functional.linear(x, weight), labels, None, reduction=reduction)

    monkeypatch.setattr(models.llama, "liger_cross_entropy", liger_stand_in)
    cfg = ModelConfig(**{**SHAPE, **case})
    model = Llama(cfg, seed=0)
    tokens, labels, _ = batch(cfg)
    recompute(model, fused_loss=False)
    unfused = loss_and_grads(model, tokens, labels, "sum")
    applies = case["norm_scheme"] != "ngpt"
    assert recompute(model, fused_loss=True, liger=True) == {"liger" if applies else "chunked"}
    assert_same(loss_and_grads(model, tokens, labels, "sum"), unfused, 1e-6, "liger routing")
    weight = model.tok_emb.weight if model.head is None else model.head.weight
    assert [w is weight for w in calls] == ([True] if applies else [])
    with torch.no_grad():
        model(tokens, labels)
    assert len(calls) == applies  # evaluation stays on the chunked path
    assert recompute(model, fused_loss=False, liger=True) == {"unfused"} and not model.liger


def test_a_fused_loss_holds_no_logits_of_the_whole_batch(monkeypatch):
    """What autograd keeps for backward: no tensor with a [tokens, V] shape of more than one chunk of tokens."""
    monkeypatch.setattr(models.parallel, "LOSS_CHUNK_ELEMENTS", 8 * SHAPE["vocab_size"])
    cfg = ModelConfig(**SHAPE)
    model = Llama(cfg, seed=0)
    tokens, labels, _ = batch(cfg)
    kept = []

    def pack(t):
        kept.append(tuple(t.shape))
        return t

    for fused in (False, True):
        kept.clear()
        recompute(model, fused_loss=fused)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(tokens, labels).backward()
        vocab_rows = [s[0] if len(s) == 2 else s[0] * s[1] for s in kept if s and s[-1] == cfg.vocab_size and
                      len(s) >= 2 and s != (cfg.vocab_size, cfg.d_model)]
        if fused:
            assert max(vocab_rows, default=0) <= 8, kept
        else:
            assert max(vocab_rows) == tokens.numel()  # the check can fail: unfused, the whole batch's logits are kept


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("case", SCHEMES, ids=scheme_id)
@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(mode, case, packed):
    cfg = ModelConfig(**{**SHAPE, **case})
    model = Llama(cfg, seed=0)
    tokens, labels, kwargs = batch(cfg, packed)
    plain = loss_and_grads(model, tokens, labels, **kwargs)
    recompute(model, mode)
    assert_same(loss_and_grads(model, tokens, labels, **kwargs), plain, 1e-6, mode)
    with torch.no_grad():  # evaluation never recomputes, and computes the same
        torch.testing.assert_close(model(tokens, labels, **kwargs), plain[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_the_diagnostics_see_each_block_once_under_recomputation(mode):
    """The in-loop diagnostics tap each block's slots (pretrain/diagnostics/taps.py, once per measured step); the
    recomputation in backward must neither call them again nor change what they saw."""
    cfg = ModelConfig(**SHAPE)
    seen: dict[str, list] = {"none": [], mode: []}
    for current in seen:
        model = Llama(cfg, seed=0)
        recompute(model, current)
        taps = [BlockTaps(i, b, seen[current].append, once=True) for i, b in enumerate(model.blocks)]
        tokens, labels, _ = batch(cfg)
        model(tokens, labels).backward()
        for tap in taps:
            tap.remove()
    assert [a.index for a in seen[mode]] == [0, 1, 2]
    for plain, again in zip(seen["none"], seen[mode]):
        for part in ("x", "y", "a", "h", "m"):
            torch.testing.assert_close(getattr(again, part), getattr(plain, part), rtol=0, atol=0)


def test_recompute_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="activation_checkpointing must be one of"):
        recompute(Llama(ModelConfig(**SHAPE), seed=0), "some")


def step_peak(case: dict) -> dict:
    """benchmarks/bench_memory.py's child: one training step's rise of the peak RSS, in a fresh interpreter."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "65536"}
    script = os.path.join(REPO, "benchmarks", "bench_memory.py")
    out = subprocess.run([sys.executable, script, "--child", json.dumps(case)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.processes  # fresh interpreters (tests/conftest.py: tiers)
def test_the_fused_loss_lowers_a_steps_peak_memory_by_more_than_40_percent():
    """V = 32,000, T = 1,024, 2 sequences: unfused the step holds the fp32 logits, their log-softmax and their
    gradient (0.26 GB each); fused one chunk of 1,048 tokens at a time."""
    shape = dict(vocab_size=32000, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_hidden=176, max_seq_len=1024)
    unfused = step_peak(dict(shape=shape, fused_loss=False, recompute="none", batch=2))
    fused = step_peak(dict(shape=shape, fused_loss=True, recompute="none", batch=2))
    assert fused["loss"] == pytest.approx(unfused["loss"], rel=1e-6)
    assert fused["step_peak_bytes"] < 0.6 * unfused["step_peak_bytes"], (fused, unfused)


@pytest.mark.processes  # fresh interpreters (tests/conftest.py: tiers)
def test_activation_checkpointing_lowers_a_16_block_steps_peak_memory():
    """16 blocks at d 256, 1,024 tokens: plain, each block keeps about 13 d + 4 ffn values per token for backward
    (q, k, v before and after RoPE, the attention output, norms, residuals, gate, up, SiLU, product); full keeps its
    input (d per token) and recomputes one block at a time, so the step's rise falls by far more than 3x; selective
    drops the SiLU output (ffn per token) and the attention core's own buffers."""
    shape = dict(vocab_size=256, d_model=256, n_layers=16, n_heads=4, n_kv_heads=4, ffn_hidden=688, max_seq_len=1024)
    plain, selective, full = (step_peak(dict(shape=shape, fused_loss=True, recompute=mode, batch=1))
                              for mode in ("none", "selective", "full"))
    assert selective["loss"] == full["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    assert full["step_peak_bytes"] < plain["step_peak_bytes"] / 3, (full, plain)
    assert selective["step_peak_bytes"] < 0.95 * plain["step_peak_bytes"], (selective, plain)
