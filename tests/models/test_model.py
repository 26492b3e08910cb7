"""The TP = 1 model: config validation, presets and parameter counts, seeding, a forward/backward smoke per
norm scheme, and checkpoints that load without torch.distributed (or megatron) in sight."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from models.config import PRESETS, ModelConfig
from models.llama import Attention, Llama
from models.norms import NORM_SCHEMES, block_parts
from models.parallel import TensorParallel

REPO = Path(__file__).resolve().parents[2]
SCHEMES = list(NORM_SCHEMES)


pytestmark = pytest.mark.usefixtures("single_thread")


def test_scheme_list_is_complete():
    assert sorted(NORM_SCHEMES) == sorted(SCHEMES)


# ---------------------------------------------------------------------------------------------------------
# Parameter counts


def closed_form_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter count from the config alone (no model), by part."""
    V, D, L, H, K, E, F = cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_hidden
    per_block_norms = {
        "pre_ln": 2 * D, "lns": 2 * D, "ln_free": 0, "post_ln": 2 * D, "mix_ln": 2 * D,
        "peri_ln": 4 * D, "reordered": 2 * D, "deepnorm": 2 * D, "dyt": 2 * (D + 1),
        "derf": 2 * (2 * D + 2),  # alpha, shift, gamma, beta
        "hybridnorm": 3 * E + D, "hybridnorm_star": 3 * E + D,  # q/k/v norms over head_dim, the post-attention norm
        "ngpt": (H + K) * E + 2 * F + 2 * D,  # s_q, s_k, s_u, s_v, the two eigen learning rates
        "keel": 4 * D,  # LN_2 before and LN_1 after each sublayer
        "gemma4": 4 * D + 2 * E + 1,  # pre and post norms, the q/k norm gains (v's has none), the layer scalar
        "muse_glimmer": 4 * D + D * H * E,  # pre and post norms (q/k norms without gain), the gate projection
    }
    final_norm = {"pre_ln": D, "lns": D, "mix_ln": D, "peri_ln": D, "reordered": D, "dyt": D + 1, "derf": 2 * D + 2,
                  "hybridnorm": D, "hybridnorm_star": D, "ln_free": 0, "post_ln": 0, "deepnorm": 0, "ngpt": 0,
                  "keel": 0, "gemma4": D, "muse_glimmer": D}
    embedding_out = {"dyt": 1, "derf": 1, "peri_ln": D}  # scalar, or peri_ln's norm; the others: none
    attention = D * (H + 2 * K) * E + H * E * D  # fused q/k/v, output projection
    mlp = 3 * D * F  # SwiGLU gate, up, down
    scheme = cfg.norm_scheme
    if scheme in per_block_norms:
        blocks = L * (attention + mlp + per_block_norms[scheme]) + (D if scheme == "hybridnorm_star" else 0)
        final, emb_out = final_norm[scheme], embedding_out.get(scheme, 0)
        logit_scale = V if scheme == "ngpt" else 0
    else:
        # The hand counts above cover the schemes written out there; a scheme added since (docs/ARCHITECTURE.md,
        # "Recipe: add a norm scheme") has its norm parts counted from its entry: every slot factory of its blocks'
        # `BlockParts` (TP = 1) and the residual update built, its final norm, embedding and logit parts. The closed
        # form still checks attention, MLP, embedding and head for any scheme.
        from models.norms import ATTENTION_SLOTS, MLP_SLOTS, SLOTS  # only here: the slots of a new scheme's parts

        def count(module: nn.Module) -> int:
            return sum(p.numel() for p in module.parameters())

        def block_norm_params(layer: int) -> int:
            parts = block_parts(cfg, layer)
            return (sum(count(getattr(parts, slot)()) for slot in SLOTS)
                    + sum(count(getattr(parts, slot)(None)) for slot in ATTENTION_SLOTS + MLP_SLOTS)
                    + count(parts.residual(parts.residual_alpha)))

        entry = NORM_SCHEMES[scheme]
        blocks = L * (attention + mlp) + sum(block_norm_params(l) for l in range(1, L + 1))
        final, emb_out = count(entry.final_norm(cfg)), count(entry.embedding(cfg))
        logit_scale = count(entry.logit_scale(cfg, None))
    return {
        "embedding": V * D,
        "embedding_out": emb_out,
        "head": 0 if cfg.tie_embeddings else V * D,
        "blocks": blocks,
        "final_norm": final,
        "logit_scale": logit_scale,
    }


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_parameter_counts(preset):
    rows = []
    for scheme in SCHEMES:
        for tie in (False, True) if not NORM_SCHEMES[scheme].unit_weights else (False,):  # ngpt refuses tying
            cfg = ModelConfig.from_preset(preset, norm_scheme=scheme, tie_embeddings=tie)
            model = Llama.meta(cfg)
            parts = closed_form_params(cfg)
            total = sum(parts.values())
            assert sum(p.numel() for p in model.parameters()) == total, (scheme, tie)
            assert model.num_params() == total, (scheme, tie)
            assert model.num_params(exclude_embeddings=True) == total - parts["embedding"], (scheme, tie)
            if scheme == "pre_ln":
                rows.append(f"{preset:>5} tie={tie!s:5} total={total:>13,} without tok_emb={total - parts['embedding']:>13,}")
    print("\n" + "\n".join(rows))


def test_130m_preset_is_about_130m():
    # Sanity check of the closed form itself against the preset's name (untied, pre_ln, vocab 32000).
    n = Llama.meta(ModelConfig.from_preset("130m")).num_params()
    assert 120e6 < n < 140e6


def test_preset_overrides_and_unknown_preset():
    cfg = ModelConfig.from_preset("tiny", n_layers=2, norm_scheme="lns")
    assert (cfg.preset, cfg.n_layers, cfg.norm_scheme, cfg.d_model) == ("tiny", 2, "lns", PRESETS["tiny"]["d_model"])
    with pytest.raises(ValueError, match=r"^model\.preset: unknown preset '2b'"):
        ModelConfig.from_preset("2b")


# ---------------------------------------------------------------------------------------------------------
# Config validation


BAD_CONFIGS = {
    "unknown-scheme": ("norm_scheme", dict(norm_scheme="rms_ln")),
    "unknown-norm-type": ("norm_type", dict(norm_type="batchnorm")),
    "heads-not-dividing-d": ("d_model", dict(d_model=100, n_heads=3)),
    "kv-not-dividing-heads": ("n_kv_heads", dict(n_heads=4, n_kv_heads=3)),
    "more-kv-than-heads": ("n_kv_heads", dict(n_heads=4, n_kv_heads=8)),
    "odd-head-dim": ("d_model", dict(d_model=12, n_heads=4)),
    "zero-vocab": ("vocab_size", dict(vocab_size=0)),
    "negative-layers": ("n_layers", dict(n_layers=-1)),
    "zero-kv-heads": ("n_kv_heads", dict(n_kv_heads=0)),
    "mix-fraction": ("mix_ln_post_fraction", dict(mix_ln_post_fraction=1.5)),
    "zero-init-std": ("init_std", dict(init_std=0.0)),
    "zero-eps": ("norm_eps", dict(norm_eps=0.0)),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_config_errors_are_one_line_and_name_the_field(case):
    field, overrides = BAD_CONFIGS[case]
    with pytest.raises(ValueError) as e:
        ModelConfig(**overrides)
    msg = str(e.value)
    assert re.search(rf"\bmodel\.{field}\b", msg), f"error does not name model.{field}: {msg!r}"
    assert msg.startswith("model.") and "\n" not in msg, repr(msg)


def test_config_defaults():
    cfg = ModelConfig(n_heads=4)
    assert cfg.n_kv_heads == 4 and cfg.head_dim == cfg.d_model // 4
    assert cfg.norm_scheme == "pre_ln" and cfg.dyt_alpha_init is None  # None: the DyT paper's width rule


@pytest.mark.parametrize("field,overrides,tp", [
    ("model.n_heads", dict(d_model=24, n_heads=3, n_kv_heads=3), 2),
    ("model.n_kv_heads", dict(n_heads=4, n_kv_heads=1), 2),
    ("model.n_kv_heads", dict(n_heads=8, n_kv_heads=2), 4),
])
def test_tp_divisibility_errors_without_process_group(field, overrides, tp):
    """Head counts are checked before any (megatron) layer is built; tests/models/test_tensor_parallel.py checks the
    whole model, the vocabulary included, on a real TP group."""
    cfg = ModelConfig(**{"d_model": 32, **overrides})
    parts = block_parts(cfg, 1)
    with pytest.raises(ValueError, match=rf"^{re.escape(field)}=\d+ is not divisible by parallel\.tp={tp}"):
        Attention(cfg, parts, TensorParallel(group=None, size=tp, rank=0))


# ---------------------------------------------------------------------------------------------------------
# Seeding


def test_same_seed_same_weights_different_seed_different_weights():
    cfg = ModelConfig.from_preset("tiny")
    a, b, c = (Llama(cfg, seed=s).state_dict() for s in (0, 0, 1))
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
        if "norm" in k:
            assert torch.equal(a[k], c[k]), k  # norm gains start at 1 whatever the seed
        else:
            assert not torch.equal(a[k], c[k]), k
    # Every weight has its own stream: no two layers start equal.
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], a["blocks.1.attn.qkv.weight"])
    # The seed decides the weights, not the global RNG state.
    torch.manual_seed(123)
    d = Llama(cfg, seed=0).state_dict()
    assert all(torch.equal(a[k], d[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------
# Forward / backward


@pytest.mark.parametrize("scheme", SCHEMES)
def test_forward_backward_smoke(scheme):
    cfg = ModelConfig.from_preset("tiny", norm_scheme=scheme, max_seq_len=64)
    model = Llama(cfg, seed=0)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(cfg.vocab_size, (2, 16), generator=gen)
    labels = torch.randint(cfg.vocab_size, (2, 16), generator=gen)
    logits = model(tokens)
    assert logits.shape == (2, 16, cfg.vocab_size) and logits.dtype == torch.float32
    loss = model(tokens, labels)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # Small init: near-uniform predictions (logits of std about init_std * sqrt(d) behind a unit-RMS final norm:
    # 0.23 at 0.02, 0.63 at hybridnorm's sqrt(2/(5d))).
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1 + cfg.weight_std ** 2 * cfg.d_model, loss.item()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, f"{name} got a zero gradient"


# Every scheme, and the residual streams (the stages pass the state [B, T, n, D] on, the readout stage collapses it).
STAGE_CASES = [(scheme, {}) for scheme in SCHEMES] + [("pre_ln", {"residual": r})
                                                     for r in ("mhc", "hc", "attn_res", "siamese")]


@pytest.mark.parametrize("scheme,keys", STAGE_CASES,
                         ids=[s + "".join(f"-{v}" for v in k.values()) for s, k in STAGE_CASES])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_pipeline_stages_are_the_model(scheme, keys, tied):
    """The pipeline's stages (models/pipeline.py), built one by one as DeepSpeed builds them, hold exactly the
    weights of `Llama` with the same seed under the same names, and chained they compute its logits bit for bit:
    the model is defined once."""
    from models.pipeline import (BlockStage, EmbeddingStage, HeadStage, ReadoutStage, full_name_prefix, pipeline_loss,
                                 tied_loss_forward)

    if tied and NORM_SCHEMES[scheme].unit_weights:
        pytest.skip("ngpt refuses tied embeddings")
    cfg = ModelConfig.from_preset("tiny", norm_scheme=scheme, n_layers=3, max_seq_len=32, tie_embeddings=tied, **keys)
    model = Llama(cfg, seed=7)
    first = EmbeddingStage(cfg, None, 7)
    blocks = [BlockStage(cfg, l, None, 7) for l in range(1, cfg.n_layers + 1)]
    last = first if tied else HeadStage(cfg, None, 7)
    stages = [first, *blocks, ReadoutStage(cfg, 7), last]
    pipelined = {}
    for index, stage in enumerate(stages):
        pipelined.update({full_name_prefix(cfg, index) + k: v for k, v in stage.state_dict().items()})
    reference = model.state_dict()
    assert sorted(pipelined) == sorted(reference)
    for key, value in reference.items():
        assert torch.equal(pipelined[key], value), key
    tokens = torch.randint(cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(tokens, -1, 1)
    labels[0, :5] = -100
    x = (tokens, labels)
    for stage in stages[:-1]:
        x = stage(x)
    assert torch.equal(last.logits(x[0]), model(tokens))
    loss_sum = tied_loss_forward(first, x) if tied else last(x)  # the last stage makes the logits and the loss
    assert torch.equal(loss_sum, model(tokens, labels, reduction="sum"))
    torch.testing.assert_close(pipeline_loss(loss_sum, labels), model(tokens, labels), rtol=1e-6, atol=0)
    assert torch.equal(pipeline_loss(loss_sum, (labels, torch.tensor(0.5))), loss_sum * 0.5)


def test_ignore_index_and_causality():
    cfg = ModelConfig.from_preset("tiny", n_layers=2)
    model = Llama(cfg, seed=0)
    tokens = torch.randint(cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    labels = tokens.clone()
    labels[:, :8] = -100
    logits = model(tokens)
    ref = torch.nn.functional.cross_entropy(logits[0, 8:], labels[0, 8:])
    torch.testing.assert_close(model(tokens, labels), ref)
    # Changing a later token does not change earlier logits.
    t2 = tokens.clone()
    t2[0, 10] = (t2[0, 10] + 1) % cfg.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(model(t2)[0, :10], logits[0, :10].detach())
        assert not torch.allclose(model(t2)[0, 10:], logits[0, 10:].detach())


def test_tied_embeddings():
    cfg = ModelConfig.from_preset("tiny", n_layers=2, tie_embeddings=True)
    model = Llama(cfg, seed=0)
    assert model.head is None and "head.weight" not in model.state_dict()
    untied = Llama(ModelConfig.from_preset("tiny", n_layers=2), seed=0)
    assert untied.num_params() - model.num_params() == cfg.vocab_size * cfg.d_model
    x = torch.randn(1, 3, cfg.d_model)
    torch.testing.assert_close(model.logits(x), x @ model.tok_emb.weight.T)


# ---------------------------------------------------------------------------------------------------------
# TP = 1 is plain PyTorch


def test_tp1_model_is_plain_pytorch():
    model = Llama(ModelConfig.from_preset("tiny", n_layers=2), seed=0)
    assert model.tp is None and not torch.distributed.is_initialized()
    assert type(model.tok_emb) is nn.Embedding
    for name, m in model.named_modules():
        assert type(m).__module__.startswith(("torch.", "models.")), f"{name}: {type(m)}"
        if name.endswith((".qkv", ".o", ".gate", ".up", ".down")):  # the projections (q_norm / k_norm are norms)
            assert type(m) is nn.Linear, f"{name}: {type(m)}"


@pytest.mark.processes
def test_checkpoint_loads_without_torch_distributed(tmp_path):
    """torch.save'd state dict -> fresh Llama(cfg) in a new interpreter (a notebook): no process group,
    megatron-core never imported, strict load, same logits."""
    cfg = ModelConfig.from_preset("tiny", n_layers=2, norm_scheme="dyt")
    model = Llama(cfg, seed=3)
    tokens = torch.randint(cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(tokens)
    torch.save({"model": model.state_dict(), "tokens": tokens, "logits": expected}, tmp_path / "ckpt.pt")

    # The same in this process first (quick, and a clearer failure).
    fresh = Llama(cfg, seed=4)
    fresh.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"])
    with torch.no_grad():
        assert torch.equal(fresh(tokens), expected)

    script = textwrap.dedent(f"""
        import sys, torch
        from models import Llama, ModelConfig
        ckpt = torch.load({str(tmp_path / 'ckpt.pt')!r}, weights_only=True)
        model = Llama(ModelConfig(**{cfg.__dict__!r}), seed=99)
        model.load_state_dict(ckpt["model"])
        with torch.no_grad():
            # (not bit-equal: this interpreter may use another number of threads)
            torch.testing.assert_close(model(ckpt["tokens"]), ckpt["logits"], rtol=1e-5, atol=1e-6)
        assert not torch.distributed.is_initialized(), "a process group was created"
        loaded = sorted(m for m in sys.modules if m.startswith(("megatron", "deepspeed")))
        assert not loaded, f"imported {{loaded[:5]}}"
        print("OK")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
