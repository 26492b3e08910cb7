"""The norm schemes' formulas, written out by hand from their papers: one registration per entry of
models/norms.py `NORM_SCHEMES`, never a call into the model's code for what a scheme computes.

tests/models/test_norm_schemes.py checks every entry of the table against its formula here (a block, the final norm, the
whole model); a scheme without one fails there with "no formula for NAME". A new scheme (docs/ARCHITECTURE.md,
"Recipe: add a norm scheme") adds its formula without touching any test's code:

    from helpers.scheme_formulas import block_formula_of

    @block_formula_of("lns_inverse")
    def _lns_inverse(f, x):  # x + Attn(N(x) / l), then x + MLP(N(x) / l)
        h = f.add(x, f.attn(f.N(x, f.block.attn_norm) / f.l))
        return f.add(h, f.mlp(f.N(h, f.block.mlp_norm) / f.l))

`f` (`Ops`) holds the building blocks: `N` (the run's norm, RMSNorm or LayerNorm, with the run's gain convention),
`attn` (the attention written out by `attention_formula`), `mlp` (the block's MLP as the branch function), the
residual adds `add` / `post_add` (GPAS-aware), the `block` whose weights the formula reads, `cfg`, `l` (1..L) and `L`.
The decorator's keywords give the rest where a scheme has it: `final`, what sits between the last block and the
head ("norm", the default; "dyt", "derf", or None for nothing), and `embedding` / `logits`, hand formulas
(cfg, model, x) -> x for the entry's `embedding` part (on the token embedding's output) and `logit_scale` (on the
logits).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

import pytest
import torch

from models.config import ModelConfig
from models.norms import NORM_SCHEMES, NormScheme

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().relative_to(REPO).as_posix()  # this file, as the failure message names it

BlockFormula = Callable[["Ops", torch.Tensor], torch.Tensor]
ModelPartFormula = Callable[[ModelConfig, torch.nn.Module, torch.Tensor], torch.Tensor]  # (cfg, model, x) -> x

BLOCK_FORMULAS: dict[str, BlockFormula] = {}  # scheme -> its block l, written out
FINAL_NORMS: dict[str, str | None] = {}  # scheme -> what sits between the last block and the head
EMBEDDING_FORMULAS: dict[str, ModelPartFormula] = {}  # scheme -> its part on the token embedding's output
LOGIT_FORMULAS: dict[str, ModelPartFormula] = {}  # scheme -> its part on the logits
FINAL_KINDS = ("norm", "dyt", "derf", None)


def block_formula_of(name: str, *, final: str | None = "norm", embedding: ModelPartFormula | None = None,
                     logits: ModelPartFormula | None = None) -> Callable[[BlockFormula], BlockFormula]:
    """Register `fn(ops, x) -> block output` as scheme `name`'s block formula (see the module docstring)."""
    assert final in FINAL_KINDS, f"{name}: final={final!r}, not one of {FINAL_KINDS}"

    def register(fn: BlockFormula) -> BlockFormula:
        assert name not in BLOCK_FORMULAS, f"two formulas for {name}"
        BLOCK_FORMULAS[name], FINAL_NORMS[name] = fn, final
        if embedding is not None:
            EMBEDDING_FORMULAS[name] = embedding
        if logits is not None:
            LOGIT_FORMULAS[name] = logits
        return fn

    return register


def no_formula(name: str, what: str = "block") -> str:
    return (f"no formula for {name}: write {what} {name} out by hand in {HERE} "
            f"(docs/ARCHITECTURE.md, Recipe: add a norm scheme)")


def _default_of(field: str):
    return NormScheme.__dataclass_fields__[field].default


# ---------------------------------------------------------------------------------------------------------
# The building blocks, written out


def rms_norm(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def layer_norm(x, w, eps):
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w


NORMS = {"rmsnorm": rms_norm, "layernorm": layer_norm}


def dyt(x, alpha, w, b=None):
    y = w * torch.tanh(alpha * x)
    return y if b is None else y + b


def derf(x, site, gamma):
    """Derf (arXiv 2512.10938): gamma * erf(alpha x + s) + beta."""
    return gamma * torch.erf(site.alpha * x + site.shift) + site.bias


def unit(x):
    """nGPT's Norm: x / |x| over the last dim."""
    return x / x.norm(dim=-1, keepdim=True)


def gain(cfg: ModelConfig, norm) -> torch.Tensor:
    """A norm's gain: w, or 1 + w with model.norm_gain=zero_centered."""
    return norm.weight + (1.0 if cfg.norm_gain == "zero_centered" else 0.0)


# Muse Glimmer's released qk_scale_factor (transformers MuseGlimmerTextConfig), written here again on purpose.
MUSE_Q_FACTOR = 3.87


def attention_formula(cfg: ModelConfig, attn, x: torch.Tensor, cos, sin, *, qkv_norm: bool = False,
                      sphere_qk: bool = False, qk_scale: str | None = None, v_norm: bool = False,
                      gate: str | None = None) -> torch.Tensor:
    """Causal GQA attention written out. q and k normalized before RoPE with model.qk_norm: per head over head_dim
    (Qwen3, Gemma 3), or over the whole projected width n_heads*E / n_kv_heads*E (OLMo 2); `qkv_norm` (hybridnorm):
    q, k and v each per head; `sphere_qk` (ngpt): q and k per head on the unit sphere after RoPE times s_q, s_k,
    softmax scale sqrt(E). model.attn_gate: the heads' output times sigmoid(x W_g), one gate per head or per head
    and channel (Qiu et al., 2025, G1). model.qk_norm_scale (or `qk_scale` for the schemes that have it built in):
    "learned", the per-head q/k norms with their gains at attention scale 1 (Gemma 4: Gemma4TextAttention.scaling
    = 1.0); "none", q and k RMS-normalized per head without gain, q times 3.87, scale 1/sqrt(E) (Muse Glimmer:
    qk_norm(q) * qk_scale_factor, scaling head_dim**-0.5). model.v_norm (or `v_norm`): v RMS-normalized per head
    without gain (Gemma 4's v_norm, with_scale=False). `gate`: the gate of a scheme that has one built in."""
    qk_scale = cfg.qk_norm_scale if qk_scale is None else qk_scale
    v_norm = v_norm or cfg.v_norm
    gate = cfg.attn_gate if gate is None else gate
    B, T, _ = x.shape
    E, K = cfg.head_dim, cfg.n_kv_heads
    Q = cfg.n_heads // K
    N = NORMS[cfg.norm_type]
    qkv = (x @ attn.qkv.weight.T).view(B, T, K, Q + 2, E)  # rows grouped per kv head: q_1..q_Q, k, v
    q, k, v = qkv[:, :, :, :Q].reshape(B, T, K * Q, E), qkv[:, :, :, Q], qkv[:, :, :, Q + 1]
    if qk_scale == "none":
        q, k = rms_norm(q, 1.0, cfg.norm_eps) * MUSE_Q_FACTOR, rms_norm(k, 1.0, cfg.norm_eps)
    elif cfg.qk_norm == "head" or qkv_norm or qk_scale == "learned":
        q, k = N(q, gain(cfg, attn.q_norm), cfg.norm_eps), N(k, gain(cfg, attn.k_norm), cfg.norm_eps)
    elif cfg.qk_norm == "full":
        q = N(q.reshape(B, T, -1), gain(cfg, attn.q_norm), cfg.norm_eps).view(B, T, K * Q, E)
        k = N(k.reshape(B, T, -1), gain(cfg, attn.k_norm), cfg.norm_eps).view(B, T, K, E)
    if qkv_norm:
        v = N(v, gain(cfg, attn.v_norm), cfg.norm_eps)
    if v_norm:
        v = rms_norm(v, 1.0, cfg.norm_eps)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, E]

    def rope(t):
        t1, t2 = t.chunk(2, dim=-1)
        return t * cos[:T] + torch.cat([-t2, t1], dim=-1) * sin[:T]

    q, k = rope(q), rope(k)
    scale = 1.0 if qk_scale == "learned" else 1 / math.sqrt(E)
    if sphere_qk:  # s_qk = stored * 1 / (1/sqrt(d))
        s_q = (attn.q_scale.scale.weight * math.sqrt(cfg.d_model)).view(K * Q, 1, E)
        s_k = (attn.k_scale.scale.weight * math.sqrt(cfg.d_model)).view(K, 1, E)
        q, k, scale = unit(q) * s_q, unit(k) * s_k, math.sqrt(E)
    k, v = k.repeat_interleave(Q, dim=1), v.repeat_interleave(Q, dim=1)  # query head h reads kv head h // Q
    scores = q @ k.transpose(-1, -2) * scale
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2)  # [B, T, H, E]
    if gate != "none":
        y = y * torch.sigmoid(x @ attn.out_gate.proj.weight.T).view(B, T, K * Q, -1)
    return y.reshape(B, T, -1) @ attn.o.weight.T


def ngpt_mlp(cfg, mlp, h):
    """nGPT's SwiGLU (NVIDIA/ngpt): u = s_u sqrt(d) W_u h, v = s_v sqrt(d) W_v h, W_o (u * SiLU(v))."""
    d = cfg.d_model
    u = (h @ mlp.up.weight.T) * mlp.up_scale.weight * math.sqrt(d)
    v = (h @ mlp.gate.weight.T) * mlp.gate_scale.weight * math.sqrt(d)
    return (u * torch.nn.functional.silu(v)) @ mlp.down.weight.T


@dataclasses.dataclass
class Ops:
    """What a block formula is written with: block `l` (1..L) of a model of config `cfg`, its weights in `block`."""

    cfg: ModelConfig
    block: torch.nn.Module
    l: int
    cos: torch.Tensor
    sin: torch.Tensor

    @property
    def L(self) -> int:
        return self.cfg.n_layers

    def N(self, y, norm):
        """The run's norm (model.norm_type) with `norm`'s gain, w or 1 + w per model.norm_gain."""
        return NORMS[self.cfg.norm_type](y, gain(self.cfg, norm), self.cfg.norm_eps)

    def attn(self, y, **kw):
        """The block's attention written out (`attention_formula`, its q/k norms and gate per the config)."""
        return attention_formula(self.cfg, self.block.attn, y, self.cos, self.sin, **kw)

    def mlp(self, y):
        """The block's MLP as the branch function F."""
        return self.block.mlp(y)

    @property
    def _gpas(self):
        # GPAS (Chen et al., 2025): P(z) = z - SiLU(g) stopgrad(z), forward value z (1 - SiLU(g)).
        return 1.0 - torch.nn.functional.silu(self.block.residual.gate) if self.cfg.gpas else 1.0

    def add(self, y, f):
        """A pre-norm block's residual add (GPAS after it)."""
        return (y + f) * self._gpas

    def post_add(self, y, f, alpha=1.0):
        """A post-norm block's residual add, alpha y + f (GPAS on the shortcut)."""
        return alpha * y * self._gpas + f


# ---------------------------------------------------------------------------------------------------------
# The schemes


@block_formula_of("pre_ln")
def _pre_ln(f: Ops, x):
    h = f.add(x, f.attn(f.N(x, f.block.attn_norm)))
    return f.add(h, f.mlp(f.N(h, f.block.mlp_norm)))


@block_formula_of("lns")
def _lns(f: Ops, x):  # LayerNorm Scaling: both norm outputs of block l times 1/sqrt(l); the final norm unscaled
    r = 1.0 / math.sqrt(f.l)
    h = f.add(x, f.attn(f.N(x, f.block.attn_norm) * r))
    return f.add(h, f.mlp(f.N(h, f.block.mlp_norm) * r))


@block_formula_of("ln_free", final=None)
def _ln_free(f: Ops, x):
    h = x + f.attn(x)
    return h + f.mlp(h)


@block_formula_of("post_ln", final=None)
def _post_ln(f: Ops, x):
    h = f.N(f.post_add(x, f.attn(x)), f.block.attn_post_norm)
    return f.N(f.post_add(h, f.mlp(h)), f.block.mlp_post_norm)


@block_formula_of("mix_ln")
def _mix_ln(f: Ops, x):  # Post-LN in blocks l <= floor(0.25 L), Pre-LN after
    return (_post_ln if f.l <= math.floor(0.25 * f.L) else _pre_ln)(f, x)


def _peri_ln_embedding(cfg, model, x):  # Peri-LN normalizes the embedding's output too
    return NORMS[cfg.norm_type](x, gain(cfg, model.emb_out), cfg.norm_eps)


@block_formula_of("peri_ln", embedding=_peri_ln_embedding)
def _peri_ln(f: Ops, x):
    h = f.add(x, f.N(f.attn(f.N(x, f.block.attn_norm)), f.block.attn_out_norm))
    return f.add(h, f.N(f.mlp(f.N(h, f.block.mlp_norm)), f.block.mlp_out_norm))


@block_formula_of("reordered")
def _reordered(f: Ops, x):  # OLMo 2: h = x + N(Attn(x)), out = h + N(MLP(h))
    h = x + f.N(f.attn(x), f.block.attn_out_norm)
    return h + f.N(f.mlp(h), f.block.mlp_out_norm)


@block_formula_of("deepnorm", final=None)
def _deepnorm(f: Ops, x):  # x_{l+1} = N(alpha x + F(x)), alpha = (2L)^(1/4)
    a = (2 * f.L) ** 0.25
    h = f.N(f.post_add(x, f.attn(x), a), f.block.attn_post_norm)
    return f.N(f.post_add(h, f.mlp(h), a), f.block.mlp_post_norm)


def _embedding_scalar(cfg, model, x):  # the DyT paper's LLaMA, Derf: a learnable scalar after the embedding
    return x * model.emb_out.scale


@block_formula_of("dyt", final="dyt", embedding=_embedding_scalar)
def _dyt(f: Ops, x):
    cfg, b = f.cfg, f.block
    h = x + f.attn(dyt(x, b.attn_norm.alpha, gain(cfg, b.attn_norm), b.attn_norm.bias))
    return h + f.mlp(dyt(h, b.mlp_norm.alpha, gain(cfg, b.mlp_norm), b.mlp_norm.bias))


@block_formula_of("derf", final="derf", embedding=_embedding_scalar)
def _derf(f: Ops, x):
    cfg, b = f.cfg, f.block
    h = x + f.attn(derf(x, b.attn_norm, gain(cfg, b.attn_norm)))
    return h + f.mlp(derf(h, b.mlp_norm, gain(cfg, b.mlp_norm)))


# HybridNorm: Y = X + Attn(QKVNorm(X)), X' = N(Y) + FFN(N(Y)); HybridNorm*'s first block is Pre-Norm with QKV norms:
# Y = X + Attn(QKVNorm(N(X))), X' = Y + FFN(N(Y)). The attention (with its q, k, v norms) is written out by
# attention_formula.
@block_formula_of("hybridnorm")
def _hybridnorm(f: Ops, x):
    y = f.N(x + f.attn(x, qkv_norm=True), f.block.attn_post_norm)
    return y + f.mlp(y)


@block_formula_of("hybridnorm_star")
def _hybridnorm_star(f: Ops, x):
    if f.l > 1:
        return _hybridnorm(f, x)
    h = x + f.attn(f.N(x, f.block.attn_norm), qkv_norm=True)
    return h + f.mlp(f.N(h, f.block.mlp_norm))


def _ngpt_logits(cfg, model, logits):  # logits = s_z (stored * 1 / (1/sqrt(d))) * (E_out h)
    return logits * model.logit_scale.weight * math.sqrt(cfg.d_model)


@block_formula_of("ngpt", final=None, logits=_ngpt_logits)
def _ngpt(f: Ops, x):
    # nGPT eq. 10-11: h <- Norm(h + alpha_A (Norm(h_A) - h)), the MLP alike; alpha = |stored * 0.05 sqrt(d)|.
    rates = (f.block.residual.rates * 0.05 * math.sqrt(f.cfg.d_model)).abs()
    h = unit(unit(x) + rates[0] * (unit(f.attn(x, sphere_qk=True)) - unit(x)))
    return unit(h + rates[1] * (unit(ngpt_mlp(f.cfg, f.block.mlp, h)) - h))


# Keel (Chen & Wei, 2026, arXiv 2601.19895): x_{l+1} = LN_1(alpha x_l + F(LN_2(x_l))), alpha = L, the number of
# sublayers (attention and MLP are one each here: 2 n_layers); every LN an RMSNorm with a learnable gain.
@block_formula_of("keel", final=None)
def _keel(f: Ops, x):
    a = 2 * f.L
    h = f.N(f.post_add(x, f.attn(f.N(x, f.block.attn_norm)), a), f.block.attn_post_norm)
    return f.N(f.post_add(h, f.mlp(f.N(h, f.block.mlp_norm)), a), f.block.mlp_post_norm)


def _gemma4_embedding(cfg, model, x):  # Gemma4TextScaledWordEmbedding: the lookup times sqrt(hidden_size)
    return x * math.sqrt(cfg.d_model)


# Gemma 4 (transformers Gemma4TextDecoderLayer): h = x + N(Attn(N(x))), out = s_l (h + N(MLP(N(h)))); the attention's
# q, k per-head norms with gains, v per head without, scale 1.
@block_formula_of("gemma4", embedding=_gemma4_embedding)
def _gemma4(f: Ops, x):
    h = x + f.N(f.attn(f.N(x, f.block.attn_norm), qk_scale="learned", v_norm=True), f.block.attn_out_norm)
    return (h + f.N(f.mlp(f.N(h, f.block.mlp_norm)), f.block.mlp_out_norm)) * f.block.layer_scalar.scale


def _muse_embedding(cfg, model, x):  # MuseGlimmerTextNormedEmbedding: RMSNorm without gain on the lookup
    return rms_norm(x, 1.0, cfg.norm_eps)


MUSE_POST_EPS = 1e-8  # MuseGlimmerTextConfig.post_norm_eps


# Muse Glimmer (transformers MuseGlimmerTextDecoderLayer): every block norm gain-centred, (1 + w) x / rms(x), the post
# ones with eps 1e-8: h = x + C(Attn(C(x))), out = h + C(MLP(C(h))); the attention with scaleless q/k norms (q times
# 3.87) and the sigmoid gate per channel; the final norm a plain RMSNorm (gain w).
@block_formula_of("muse_glimmer", embedding=_muse_embedding)
def _muse_glimmer(f: Ops, x):
    b, eps = f.block, f.cfg.norm_eps

    def C(y, n, e):
        return rms_norm(y, 1.0 + n.weight, e)

    h = x + C(f.attn(C(x, b.attn_norm, eps), qk_scale="none", gate="elementwise"), b.attn_out_norm, MUSE_POST_EPS)
    return h + C(f.mlp(C(h, b.mlp_norm, eps)), b.mlp_out_norm, MUSE_POST_EPS)


# ---------------------------------------------------------------------------------------------------------
# What the tests call


def block_formula(cfg: ModelConfig, block, l: int, x: torch.Tensor, cos, sin) -> torch.Tensor:
    """Block l (1-based) of `cfg.norm_scheme` with the composable keys it sets: its registered formula."""
    fn = BLOCK_FORMULAS.get(cfg.norm_scheme)
    if fn is None:
        pytest.fail(no_formula(cfg.norm_scheme), pytrace=False)
    out = fn(Ops(cfg, block, l, cos, sin), x)
    return out * block.layer_scalar.scale if cfg.layer_scalar else out  # model.layer_scalar: s_l times the output


def final_kind(scheme: str) -> str | None:
    """What sits between the last block and the head: "norm", "dyt", "derf" or None."""
    if scheme not in FINAL_NORMS:
        pytest.fail(no_formula(scheme), pytrace=False)
    return FINAL_NORMS[scheme]


def final_formula(cfg: ModelConfig, model, x: torch.Tensor) -> torch.Tensor:
    kind = final_kind(cfg.norm_scheme)
    if kind is None:
        return x
    if kind == "dyt":
        return dyt(x, model.final_norm.alpha, gain(cfg, model.final_norm), model.final_norm.bias)
    if kind == "derf":
        return derf(x, model.final_norm, gain(cfg, model.final_norm))
    return NORMS[cfg.norm_type](x, gain(cfg, model.final_norm), cfg.norm_eps)  # never depth-scaled


def _model_part(table: dict[str, ModelPartFormula], field: str, cfg: ModelConfig, model, x):
    fn = table.get(cfg.norm_scheme)
    if fn is not None:
        return fn(cfg, model, x)
    # the entry's part: its default (nothing) needs no formula
    if getattr(NORM_SCHEMES[cfg.norm_scheme], field) is not _default_of(field):
        pytest.fail(no_formula(cfg.norm_scheme, f"the `{field}` part of"), pytrace=False)
    return x


def embedding_formula(cfg: ModelConfig, model, x: torch.Tensor) -> torch.Tensor:
    """The scheme's part on the token embedding's output (nothing by default)."""
    return _model_part(EMBEDDING_FORMULAS, "embedding", cfg, model, x)


def logit_formula(cfg: ModelConfig, model, logits: torch.Tensor) -> torch.Tensor:
    """The scheme's part on the logits (nothing by default)."""
    return _model_part(LOGIT_FORMULAS, "logit_scale", cfg, model, logits)
