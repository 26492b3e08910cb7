"""Every norm scheme computes its formula (models/norms.py), checked against hand-written math.

The reference (tests/helpers/scheme_formulas.py, one registered formula per scheme) writes RMSNorm, LayerNorm and DyT
out explicitly and uses only the block's own attention and MLP as the branch functions F, so a norm in the wrong
place, a missing 1/sqrt(l), a wrong residual weight or a wrong final norm changes the result. l = 1..L counts
blocks from the input. The tests here run every entry of NORM_SCHEMES, so a new scheme is checked as soon as it
and its formula are registered (docs/ARCHITECTURE.md, "Recipe: add a norm scheme").

Models run in float64. RMSNorm/LayerNorm compute their statistics in float32 (models/norms.py), so schemes
that use them are compared to 1e-6; ln_free and dyt have no float32 step and are compared to 1e-10.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from models.config import ModelConfig
from models.llama import Llama
from models.norms import NORM_SCHEMES, embedding_init_gain
from helpers.scheme_formulas import (
    BLOCK_FORMULAS,
    attention_formula,
    block_formula,
    embedding_formula,
    final_formula,
    final_kind,
    layer_norm,
    logit_formula,
    rms_norm,
)

SCHEMES = list(NORM_SCHEMES)  # every entry of the table needs its formula in tests/helpers/scheme_formulas.py


pytestmark = pytest.mark.usefixtures("single_thread")
# d 8, 2 query heads over 1 kv head (GQA), 4 layers: mix_ln has floor(0.25 * 4) = 1 Post-LN block.
TINY = dict(vocab_size=32, d_model=8, n_layers=4, n_heads=2, n_kv_heads=1, ffn_hidden=16, max_seq_len=16)


# ---------------------------------------------------------------------------------------------------------
# Helpers


def tol(cfg: ModelConfig) -> float:
    return 1e-10


def make_model(scheme: str, norm_type: str = "rmsnorm", seed: int = 0, **overrides) -> tuple[ModelConfig, Llama]:
    """A float64 model whose norm gains and DyT alphas are moved off their init (so that they matter)."""
    cfg = ModelConfig(**{**TINY, "norm_scheme": scheme, "norm_type": norm_type, **overrides})
    model = Llama(cfg, seed=seed).double()
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".alpha"):
                p.copy_(0.3 + 0.6 * torch.rand(p.shape, generator=gen, dtype=p.dtype))
            elif name.endswith((".bias", ".shift", "residual.gate")):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            elif "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            elif "scale" in name or name.endswith(".rates"):  # ngpt's scaling vectors, dyt/derf's embedding scale
                p.mul_(1.0 + 0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return cfg, model


def residual_input(cfg: ModelConfig, seed: int = 1) -> torch.Tensor:
    # Not mean-centred, so RMSNorm and LayerNorm give different results.
    gen = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(2, 7, cfg.d_model, generator=gen, dtype=torch.float64) + 0.5


def assert_close(actual, expected, atol, what=""):
    err = (actual - expected).abs().max().item()
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol:g}"


CASES = [(s, "rmsnorm") for s in SCHEMES] + [("pre_ln", "layernorm"), ("peri_ln", "layernorm"), ("dyt", "bias")]
CASE_IDS = [s if t == "rmsnorm" else f"{s}-{t}" for s, t in CASES]


def case_model(scheme, norm_type, **overrides):
    if norm_type == "bias":  # DyT with its optional bias
        return make_model(scheme, dyt_bias=True, **overrides)
    return make_model(scheme, norm_type, **overrides)


# ---------------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("scheme,norm_type", CASES, ids=CASE_IDS)
def test_every_block_matches_formula(scheme, norm_type):
    cfg, model = case_model(scheme, norm_type)
    x = residual_input(cfg)
    with torch.no_grad():
        for l, block in enumerate(model.blocks, start=1):
            got = block(x, model.rope_cos, model.rope_sin)
            want = block_formula(cfg, block, l, x, model.rope_cos, model.rope_sin)
            assert_close(got, want, tol(cfg), f"{scheme}/{norm_type} block {l}")
            # Not vacuous: the branches changed the stream well beyond the tolerance.
            assert (got - x).abs().max() > 1e-3


@pytest.mark.parametrize("scheme,norm_type", CASES, ids=CASE_IDS)
def test_whole_model_matches_formula(scheme, norm_type):
    """Embedding, the blocks in order, the scheme's final norm (or none) and the head."""
    cfg, model = case_model(scheme, norm_type, tie_embeddings=(scheme == "peri_ln"))
    tokens = torch.randint(cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(tokens)
        x = embedding_formula(cfg, model, model.tok_emb.weight[tokens])  # dyt/derf's scalar, peri_ln's norm
        for l, block in enumerate(model.blocks, start=1):
            x = block_formula(cfg, block, l, x, model.rope_cos, model.rope_sin)
        head = model.tok_emb.weight if cfg.tie_embeddings else model.head.weight
        want = logit_formula(cfg, model, final_formula(cfg, model, x) @ head.T)  # ngpt's s_z
    assert_close(got, want, tol(cfg), f"{scheme}/{norm_type} logits")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_final_norm(scheme):
    cfg, model = make_model(scheme)
    kind = final_kind(scheme)
    n_params = sum(p.numel() for p in model.final_norm.parameters())
    assert n_params == {None: 0, "norm": cfg.d_model, "dyt": cfg.d_model + 1, "derf": 2 * cfg.d_model + 2}[kind]
    x = residual_input(cfg)
    with torch.no_grad():
        got = model.final_norm(x)
    assert_close(got, final_formula(cfg, model, x), tol(cfg), f"{scheme} final norm")
    if kind is None:
        assert torch.equal(got, x)


def test_every_formula_is_of_a_scheme_of_the_table():
    """tests/helpers/scheme_formulas.py has no formula under a name the table lacks (a misspelt registration would leave its
    scheme asking for a formula)."""
    assert set(BLOCK_FORMULAS) <= set(NORM_SCHEMES), sorted(set(BLOCK_FORMULAS) - set(NORM_SCHEMES))


def test_lns_scales_block_norms_by_inverse_sqrt_depth():
    """lns is pre_ln with both norm outputs of block l times 1/sqrt(l); the final norm is not scaled.

    The reference LNS implementation gates its scaling on an environment-variable comparison that has been
    false since April 2025; this pins the formula so that our scaling cannot silently switch off.
    """
    _, pre = make_model("pre_ln")
    cfg, lns = make_model("lns")
    lns.load_state_dict(pre.state_dict())  # same weights, norm gains included
    x = residual_input(cfg)
    with torch.no_grad():
        for l in range(1, cfg.n_layers + 1):
            for part in ("attn_norm", "mlp_norm"):
                a = getattr(lns.blocks[l - 1], part)(x)
                b = getattr(pre.blocks[l - 1], part)(x)
                torch.testing.assert_close(a, b / math.sqrt(l), rtol=1e-15, atol=0)
        # Block 4: exactly half (a power of two, so no rounding); block 1: unchanged.
        assert torch.equal(lns.blocks[3].attn_norm(x), 0.5 * pre.blocks[3].attn_norm(x))
        assert torch.equal(lns.blocks[3].mlp_norm(x), 0.5 * pre.blocks[3].mlp_norm(x))
        assert torch.equal(lns.blocks[0](x, lns.rope_cos, lns.rope_sin), pre.blocks[0](x, pre.rope_cos, pre.rope_sin))
        assert torch.equal(lns.final_norm(x), pre.final_norm(x))
        # ... and the scaling is active: from block 2 on the two models differ.
        assert not torch.allclose(lns.blocks[1](x, lns.rope_cos, lns.rope_sin), pre.blocks[1](x, pre.rope_cos, pre.rope_sin))
        tokens = torch.arange(8).view(1, 8)
        assert (lns(tokens) - pre(tokens)).abs().max() > 1e-6


def test_ln_free_has_no_norm_at_all():
    cfg, model = make_model("ln_free")
    names = [n for n, _ in model.named_parameters()]
    weights = ("attn.qkv.weight", "attn.o.weight", "mlp.gate.weight", "mlp.up.weight", "mlp.down.weight")
    allowed = {"tok_emb.weight", "head.weight"} | {f"blocks.{i}.{w}" for i in range(cfg.n_layers) for w in weights}
    assert set(names) <= allowed, f"ln_free has norm parameters: {sorted(set(names) - allowed)}"
    assert len(names) == len(allowed)
    for block in model.blocks:
        for part in ("attn_norm", "attn_out_norm", "attn_post_norm", "mlp_norm", "mlp_out_norm", "mlp_post_norm"):
            assert isinstance(getattr(block, part), torch.nn.Identity)
    assert isinstance(model.final_norm, torch.nn.Identity)


@pytest.mark.parametrize("n_layers,n_post", [(3, 0), (4, 1), (8, 2), (12, 3)])
def test_mix_ln_post_ln_blocks(n_layers, n_post):
    cfg = ModelConfig(**{**TINY, "n_layers": n_layers, "norm_scheme": "mix_ln"})
    with torch.device("meta"):
        model = Llama(cfg)
    post = [any(True for _ in b.attn_post_norm.parameters()) for b in model.blocks]
    pre = [any(True for _ in b.attn_norm.parameters()) for b in model.blocks]
    assert post == [l <= n_post for l in range(1, n_layers + 1)]
    assert pre == [not p for p in post]


def _std(t: torch.Tensor) -> float:
    return t.double().std().item()


@pytest.mark.parametrize("scheme", ["pre_ln", "deepnorm", "ln_free", "hybridnorm"])
def test_init_gains(scheme):
    """deepnorm: beta = (8L)^(-1/4) where DeepNet puts it, on the value and attention-output projections and the
    FFN's two matrices, which in SwiGLU are up and down (gate, like q and k, stays at init_std: scaling it too would
    start the branch near beta^3). ln_free (4 layers: no depth multipliers): 1/sqrt(2L) on the two output
    projections and an embedding at std 1 (tests/models/test_ln_free_stability.py). hybridnorm (model.init_std null): its
    OLMo config's full_megatron init, std sqrt(2/(5d)) and the output projections / sqrt(2L). pre_ln: no gains."""
    cfg = ModelConfig(
        vocab_size=64, d_model=512, n_layers=4, n_heads=8, n_kv_heads=2, ffn_hidden=1024, max_seq_len=16,
        norm_scheme=scheme, init_std=None if scheme == "hybridnorm" else 0.02,
    )
    model = Llama(cfg, seed=5)
    L, s = cfg.n_layers, cfg.weight_std
    assert s == (math.sqrt(2 / (5 * 512)) if scheme == "hybridnorm" else 0.02)
    beta = (8 * L) ** -0.25 if scheme == "deepnorm" else 1.0
    out_gain = beta if scheme == "deepnorm" else (1 / math.sqrt(2 * L) if scheme in ("ln_free", "hybridnorm") else 1.0)
    q_per_kv = cfg.n_heads // cfg.n_kv_heads
    # Pool the four blocks so the estimates are tight (>= 500k samples each, std error < 0.2%).
    qkv = torch.stack([b.attn.qkv.weight.view(cfg.n_kv_heads, q_per_kv + 2, cfg.head_dim, cfg.d_model) for b in model.blocks])
    expected = {
        "q": (qkv[:, :, :q_per_kv], s),
        "k": (qkv[:, :, q_per_kv], s),
        "v": (qkv[:, :, q_per_kv + 1], s * beta),
        "o": (torch.stack([b.attn.o.weight for b in model.blocks]), s * out_gain),
        "gate": (torch.stack([b.mlp.gate.weight for b in model.blocks]), s),
        "up": (torch.stack([b.mlp.up.weight for b in model.blocks]), s * beta),
        "down": (torch.stack([b.mlp.down.weight for b in model.blocks]), s * out_gain),
        "tok_emb": (model.tok_emb.weight, s * embedding_init_gain(cfg)),  # ln_free: unit variance
        "head": (model.head.weight, s),
    }
    for name, (w, want) in expected.items():
        rel_tol = 0.05 if name in ("tok_emb", "head") else 0.02  # the embeddings have only 32k samples
        got = _std(w)
        assert abs(got / want - 1) < rel_tol, f"{scheme} {name}: std {got:.5f}, expected {want:.5f}"
        assert abs(w.double().mean().item()) < 0.05 * want, f"{scheme} {name}: mean not ~0"


@pytest.mark.parametrize("d_model,attn,other", [(8, 0.8, 0.2), (4096, 0.8, 0.2), (5120, 0.6, 0.15), (8192, 0.2, 0.05)])
def test_dyt_alpha_defaults_follow_the_papers_llama_widths(d_model, attn, other):
    """The DyT paper's LLaMA alpha0 (7B d4096: 0.8 / 0.2, 13B d5120: 0.6 / 0.15, 34B/70B d8192: 0.2 / 0.05):
    one for the attention-input DyT, one for the MLP-input and final DyT; narrower models take the 7B values."""
    from models.norms import dyt_alpha_inits

    cfg = ModelConfig(**{**TINY, "d_model": d_model, "n_heads": 2, "norm_scheme": "dyt"})
    assert dyt_alpha_inits(cfg) == (attn, other)
    assert dyt_alpha_inits(ModelConfig(**{**TINY, "norm_scheme": "dyt", "dyt_alpha_init": 0.3})) == (0.8, 0.3)
    assert dyt_alpha_inits(ModelConfig(**{**TINY, "norm_scheme": "dyt", "dyt_alpha_init_attn": 1.5})) == (1.5, 0.2)


def test_dyt_alpha_is_a_learnable_scalar_initialized_from_config():
    for extra, attn, other in (({}, 0.8, 0.2), ({"dyt_alpha_init": 0.7, "dyt_alpha_init_attn": 0.9}, 0.9, 0.7)):
        cfg = ModelConfig(**{**TINY, "norm_scheme": "dyt", **extra})
        model = Llama(cfg, seed=0)
        alphas = {n: p for n, p in model.named_parameters() if n.endswith("alpha")}
        assert len(alphas) == 2 * cfg.n_layers + 1  # two per block and the final DyT
        for n, p in alphas.items():
            assert p.numel() == 1 and p.requires_grad, n
            assert p.item() == pytest.approx(attn if ".attn_norm." in n else other), n
    tokens = torch.randint(cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    model(tokens, tokens).backward()
    assert all(p.grad is not None and p.grad.abs().item() > 0 for p in alphas.values())


def test_dyt_bias_is_optional_and_learnable():
    cfg = ModelConfig(**{**TINY, "norm_scheme": "dyt", "dyt_bias": True})
    model = Llama(cfg, seed=0)
    biases = {n: p for n, p in model.named_parameters() if n.endswith(".bias")}
    assert len(biases) == 2 * cfg.n_layers + 1 and all(torch.equal(p, torch.zeros(cfg.d_model)) for p in biases.values())
    tokens = torch.randint(cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    model(tokens, tokens).backward()
    assert all(p.grad.abs().sum() > 0 for p in biases.values())
    assert not any(n.endswith(".bias") for n, _ in Llama(ModelConfig(**{**TINY, "norm_scheme": "dyt"})).named_parameters())


def test_dyt_has_no_rms_or_layernorm():
    cfg, model = make_model("dyt")
    x = residual_input(cfg)
    for block in model.blocks:
        assert sorted(n for n, _ in block.attn_norm.named_parameters()) == ["alpha", "weight"]
        assert isinstance(block.attn_post_norm, torch.nn.Identity) and isinstance(block.attn_out_norm, torch.nn.Identity)
    # DyT is bounded by |gamma| whatever the input scale, unlike a norm it does not rescale small inputs up.
    with torch.no_grad():
        y = model.blocks[0].attn_norm(1e-3 * x)
    assert y.abs().max() < 1e-2


def test_layernorm_differs_from_rmsnorm():
    """norm_type=layernorm subtracts the mean: with unit gains its output has zero mean, RMSNorm's does not."""
    cfg = ModelConfig(**{**TINY, "norm_type": "layernorm"})
    ln, rms = Llama(cfg).double(), Llama(ModelConfig(**TINY)).double()
    x = residual_input(cfg)
    with torch.no_grad():
        a, b = rms.blocks[0].attn_norm(x), ln.blocks[0].attn_norm(x)
    assert b.mean(-1).abs().max() < 1e-6
    assert a.mean(-1).abs().mean() > 0.1
    assert_close(b.pow(2).mean(-1), torch.ones(()), 1e-5, "LayerNorm output variance")


@pytest.mark.parametrize("norm_type", ["rmsnorm", "layernorm"])
def test_norms_keep_float64_precision(norm_type):
    cfg, model = make_model("pre_ln", norm_type)
    x = residual_input(cfg)
    N = {"rmsnorm": rms_norm, "layernorm": layer_norm}[norm_type]
    with torch.no_grad():
        got = model.blocks[0].attn_norm(x)
    assert_close(got, N(x, model.blocks[0].attn_norm.weight, cfg.norm_eps), 1e-12, f"float64 {norm_type}")


# ---------------------------------------------------------------------------------------------------------
# model.qk_norm: the q and k norms of attention, before RoPE


QK_CASES = [("pre_ln", "head", "rmsnorm"), ("pre_ln", "full", "rmsnorm"), ("lns", "head", "rmsnorm"),
            ("lns", "full", "rmsnorm"), ("pre_ln", "full", "layernorm"), ("peri_ln", "head", "layernorm"),
            ("deepnorm", "full", "rmsnorm"), ("dyt", "head", "rmsnorm"), ("reordered", "full", "rmsnorm")]


@pytest.mark.parametrize("scheme,qk_norm,norm_type", QK_CASES, ids=["-".join(c) for c in QK_CASES])
def test_qk_norm_matches_formula(scheme, qk_norm, norm_type):
    """Every block's attention with q/k norms against the formula, and the block around it unchanged."""
    cfg, model = make_model(scheme, norm_type, qk_norm=qk_norm)
    x = residual_input(cfg)
    cos, sin = model.rope_cos.double(), model.rope_sin.double()
    for l, block in enumerate(model.blocks, start=1):
        assert block.attn.q_norm.weight.shape == (cfg.head_dim if qk_norm == "head" else cfg.n_heads * cfg.head_dim,)
        assert block.attn.k_norm.weight.shape == (cfg.head_dim if qk_norm == "head" else cfg.n_kv_heads * cfg.head_dim,)
        with torch.no_grad():
            assert_close(block.attn(x, cos, sin), attention_formula(cfg, block.attn, x, cos, sin), tol(cfg),
                         f"{scheme} {qk_norm} block {l} attention")
            assert_close(block(x, cos, sin), block_formula(cfg, block, l, x, cos, sin), tol(cfg),
                         f"{scheme} {qk_norm} block {l}")


def test_qk_norm_none_adds_nothing_and_ln_free_refuses_it():
    _, plain = make_model("pre_ln")
    assert not any("q_norm" in n or "k_norm" in n for n, _ in plain.named_parameters())
    with pytest.raises(ValueError, match="norm-free"):
        ModelConfig(**{**TINY, "norm_scheme": "ln_free", "qk_norm": "head"})
    with pytest.raises(ValueError, match="removable_norms"):
        ModelConfig(**{**TINY, "attn_gate": "headwise", "removable_norms": True})  # q/k norms are removal sites


# ---------------------------------------------------------------------------------------------------------
# The composable keys (models/norms.py OPTIONS), crossed with pre_ln, lns and the schemes each is meant for

OPTION_CASES = [
    ("pre_ln", dict(attn_gate="headwise")), ("lns", dict(attn_gate="elementwise")),
    ("peri_ln", dict(attn_gate="elementwise")), ("ln_free", dict(attn_gate="headwise")),
    ("hybridnorm", dict(attn_gate="elementwise")),
    ("pre_ln", dict(gpas=True)), ("lns", dict(gpas=True)), ("mix_ln", dict(gpas=True)), ("peri_ln", dict(gpas=True)),
    ("deepnorm", dict(gpas=True)),
    ("pre_ln", dict(norm_gain="zero_centered")), ("lns", dict(norm_gain="zero_centered", norm_type="layernorm")),
    ("dyt", dict(norm_gain="zero_centered")), ("derf", dict(norm_gain="zero_centered")),
    ("hybridnorm_star", dict(norm_gain="zero_centered")), ("pre_ln", dict(qk_norm="head", norm_gain="zero_centered")),
    ("lns", dict(qk_norm="full", attn_gate="headwise", gpas=True, norm_gain="zero_centered")),
    # Gemma 4's and Muse Glimmer's pieces on the other schemes
    ("pre_ln", dict(v_norm=True)), ("peri_ln", dict(layer_scalar=True)), ("keel", dict(v_norm=True, layer_scalar=True)),
    ("pre_ln", dict(qk_norm="head", qk_norm_scale="learned")), ("lns", dict(qk_norm="head", qk_norm_scale="none")),
    ("peri_ln", dict(qk_norm="head", qk_norm_scale="learned", v_norm=True, layer_scalar=True,
                     norm_gain="zero_centered")),
    ("reordered", dict(qk_norm="head", qk_norm_scale="none", v_norm=True, attn_gate="elementwise")),
]
OPTION_IDS = [scheme + "-" + "-".join(f"{k}={v}" for k, v in o.items()) for scheme, o in OPTION_CASES]


@pytest.mark.parametrize("scheme,options", OPTION_CASES, ids=OPTION_IDS)
def test_composable_keys_match_formula(scheme, options):
    """Every block and the whole model with the keys set, against the formulas above; and the keys change the model
    (the formula without them differs), so none is silently ignored."""
    cfg, model = make_model(scheme, **options)
    if cfg.gpas:  # g from 0 is the identity: move it
        with torch.no_grad():
            for block in model.blocks:
                block.residual.gate.fill_(0.4)
    x = residual_input(cfg)
    cos, sin = model.rope_cos, model.rope_sin
    with torch.no_grad():
        for l, block in enumerate(model.blocks, start=1):
            got = block(x, cos, sin)
            assert_close(got, block_formula(cfg, block, l, x, cos, sin), tol(cfg), f"{scheme} {options} block {l}")
            plain = dataclasses.replace(cfg, qk_norm="none", attn_gate="none", gpas=False, norm_gain="one",
                                        qk_norm_scale=None, v_norm=False, layer_scalar=False)
            assert (got - block_formula(plain, block, l, x, cos, sin)).abs().max() > 1e-6, "a key changed nothing"


def test_gpas_scales_forward_and_keeps_the_gradient():
    """P(z) = z - SiLU(g) stopgrad(z): the forward is z (1 - SiLU(g)); the gradient through z is untouched, and g's
    is -SiLU'(g) sum(z * upstream)."""
    from models.parts import GPAS

    gpas = GPAS().double()
    with torch.no_grad():
        gpas.gate.fill_(0.7)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    f = torch.randn(2, 3, 8, dtype=torch.float64)
    up = torch.randn(2, 3, 8, dtype=torch.float64)
    y = gpas(x, f, 0)
    g = torch.tensor(0.7, dtype=torch.float64)
    assert_close(y, (x + f) * (1 - torch.nn.functional.silu(g)), 1e-14, "GPAS forward")
    (y * up).sum().backward()
    assert torch.equal(x.grad, up)
    silu_grad = torch.sigmoid(g) * (1 + g * (1 - torch.sigmoid(g)))
    assert_close(gpas.gate.grad, -silu_grad * ((x + f) * up).sum(), 1e-12, "GPAS gate gradient")
    assert GPAS().gate.item() == 0.0  # the identity at init


def test_zero_centered_gain_starts_at_zero_and_is_the_same_model():
    a = Llama(ModelConfig(**TINY, qk_norm="head"), seed=2)
    b = Llama(ModelConfig(**TINY, qk_norm="head", norm_gain="zero_centered"), seed=2)
    gains = [n for n, _ in b.named_parameters() if "norm" in n]
    assert gains and all(torch.equal(b.get_parameter(n), torch.zeros_like(b.get_parameter(n))) for n in gains)
    tokens = torch.arange(12).view(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(a(tokens), b(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("key,value", [("qk_norm", "head"), ("attn_gate", "headwise"), ("gpas", True),
                                       ("norm_gain", "zero_centered"), ("residual", "mhc")])
def test_schemes_refuse_keys_they_do_not_compose_with(key, value):
    """Every scheme either takes a composable key or refuses it in one line that names the schemes that do."""
    for scheme, entry in NORM_SCHEMES.items():
        overrides = {**TINY, "norm_scheme": scheme, key: value}
        if key in entry.options:
            ModelConfig(**overrides)
            continue
        with pytest.raises(ValueError, match=rf"^model\.{key}={value} does not compose with model\.norm_scheme={scheme} "
                                             rf"\(.+\); it composes with .*pre_ln"):
            ModelConfig(**overrides)


@pytest.mark.parametrize("d_model,init", [(128, 64.0), (4096, 64.0), (8192, math.sqrt(8192))])
def test_dyt_and_derf_embedding_scale_starts_at_the_papers_operating_point(d_model, init):
    """DyT's LLaMA and Derf scale the token embedding by a learnable scalar from sqrt(d); below the paper's smallest
    LLaMA (4096) it starts at sqrt(4096), the embedding std the paper's alpha0 are tuned for (docs/schemes.md, "DyT
    as its paper trains it")."""
    for scheme in ("dyt", "derf"):
        cfg = ModelConfig(**{**TINY, "d_model": d_model, "n_heads": 2, "norm_scheme": scheme})
        with torch.device("meta"):
            model = Llama(cfg)
        assert model.emb_out.init == pytest.approx(init)
        assert isinstance(Llama(ModelConfig(**TINY)).emb_out, torch.nn.Identity)  # other schemes: none


# ---------------------------------------------------------------------------------------------------------
# Keel, Gemma 4's and Muse Glimmer's pieces


def test_keel_is_post_ln_with_a_highway_scaled_shortcut():
    """Keel (Chen & Wei, "Post-LayerNorm Is Back: Stable, ExpressivE, and Deep", arXiv 2601.19895, January 2026).
    Its update, against Pre-LN x_{l+1} = x_l + F(LN(x_l)) and Post-LN x_{l+1} = LN(x_l + F(x_l)):

        x_{l+1} = LN_1(α x_l + F(LN_2(x_l)))

    "Highway-style Residual Scaling replaces the fixed identity-like skip with a gated path that includes a scalar α,
    set to α = L (the total number of sub-layers)"; LN_2 normalizes the sublayer's input, LN_1 the combined output,
    every LN an RMSNorm with a learnable gain and no bias; "Keel enables stable training at extreme depths without
    requiring specialized initialization". Here each of attention and MLP is a sub-layer, so α = 2 n_layers, the
    init is the plain one (model.init_std, no init gains), and the last block's LN_1 ends the stream (no final norm).
    (Read from the paper's abstract and its method as the arXiv listing, emergentmind and arxivlens summarize it;
    the paper's text itself was not in the reference corpus.)"""
    cfg, model = make_model("keel", n_layers=3)
    x = residual_input(cfg)
    cos, sin = model.rope_cos, model.rope_sin

    def N(y, norm):  # RMSNorm with a learnable gain, written out
        return y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * norm.weight

    alpha = 2 * cfg.n_layers
    with torch.no_grad():
        for l, block in enumerate(model.blocks, start=1):
            assert block.residual_alpha == alpha
            h = N(alpha * x + block.attn(N(x, block.attn_norm), cos, sin), block.attn_post_norm)
            want = N(alpha * h + block.mlp(N(h, block.mlp_norm)), block.mlp_post_norm)
            assert_close(block(x, cos, sin), want, 1e-10, f"keel block {l}")
    assert type(model.final_norm) is torch.nn.Identity
    # no special initialization: every weight at model.init_std, gains at 1
    fresh = Llama(cfg, seed=0)
    for name, p in fresh.named_parameters():
        if p.ndim == 2:
            assert abs(p.std().item() - cfg.weight_std) < 0.25 * cfg.weight_std, name
        else:
            assert torch.equal(p, torch.ones_like(p)), name


def test_qk_norm_scale_needs_per_head_qk_norms_and_v_norm_is_per_head():
    with pytest.raises(ValueError, match=r"^model\.qk_norm_scale=none: .* set model\.qk_norm=head$"):
        ModelConfig(**TINY, qk_norm_scale="none")
    with pytest.raises(ValueError, match=r"^model\.qk_norm_scale=learned: .* model\.qk_norm=full has none"):
        ModelConfig(**TINY, qk_norm="full", qk_norm_scale="learned")
    with pytest.raises(ValueError, match=r"^model\.removable_norms: norm removal does not cover the v norm"):
        ModelConfig(**TINY, v_norm=True, removable_norms=True)
    with pytest.raises(ValueError, match=r"^model\.v_norm=True does not compose with model\.norm_scheme=gemma4 "
                                         r"\(it normalizes v per head itself\)"):
        ModelConfig(**TINY, norm_scheme="gemma4", v_norm=True)
    # v_norm: each head of v brought to RMS 1 on its own, no parameter
    cfg, model = make_model("pre_ln", v_norm=True)
    v_norm = model.blocks[0].attn.v_norm
    assert not list(v_norm.parameters())
    v = torch.randn(2, 5, 2, cfg.head_dim, dtype=torch.float64) * torch.tensor([1.0, 30.0]).view(1, 1, 2, 1)
    with torch.no_grad():
        assert_close(v_norm(v), v / v.pow(2).mean(-1, keepdim=True).add(cfg.norm_eps).sqrt(), 1e-12, "v norm")
