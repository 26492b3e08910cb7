"""The one table that says where each scheme puts its normalization layers (models/norm_layers.py).

A block (models/llama.py) always computes

    h   = attn_post_norm(R(x, attn_out_norm(Attn(attn_norm(x)))))
    out = mlp_post_norm (R(h, mlp_out_norm (MLP (mlp_norm (h)))))

with the residual update R(x, F) = alpha x + F (GPAS and nGPT replace it, models/parts.py). Attention has slots of its
own (`ATTENTION_SLOTS`: q, k, v norms before RoPE, q/k scales after it, the output gate) and so has the MLP
(`MLP_SLOTS`). A scheme is nothing but the choice of those parts (nn.Identity where it has none), alpha and a few
init gains, per layer l = 1..L (`BlockParts`); the composable keys (`OPTIONS`: qk_norm, attn_gate, gpas, norm_gain,
residual) rewrite a scheme's parts (and v_norm, qk_norm_scale, layer_scalar: the pieces of Gemma 4's and Muse
Glimmer's blocks, for the other schemes); model.residual makes the residual a state of n streams (models/streams.py).
Adding a scheme means adding one entry to `NORM_SCHEMES`, never an `if` in the forward.

    pre_ln    x = x + F(N(x))                                   final N
    lns       x = x + F(N(x) / sqrt(l))   (LayerNorm Scaling)   final N, unscaled
    ln_free   x = x + c_out F(c_in x), fixed depth-muP multipliers    no final norm; depth-scaled output init
    post_ln   x = N(x + F(x))                                   no final norm (last block ends in N)
    mix_ln    post_ln in blocks l <= floor(0.25 L), pre_ln after final N
    peri_ln   x = x + N_out(F(N_in(x))), embedding output normalized   final N
    reordered x = x + N(F(x))   (OLMo 2)                        final N
    deepnorm  x = N(alpha x + F(x)), alpha = (2L)^(1/4),        no final norm
              init gain beta = (8L)^(-1/4) on value, attention-output, MLP up and down weights
    hybridnorm      y = x + Attn_QKVnorm(x), x' = N(y) + FFN(N(y))      final N; init sqrt(2/(5d)), outputs / sqrt(2L)
    hybridnorm_star hybridnorm with a Pre-Norm first block (QKV norms kept)
    dyt       N replaced by DyT(x) = gamma * tanh(alpha x) (+ b); embedding x learnable sqrt(max(d, 4096))   final DyT
    derf      N replaced by gamma * erf(alpha x + s) + beta; embedding as dyt                final Derf
    ngpt      x = n(x + alpha (n(F(x)) - x)) on the unit sphere; unit-norm weights after every step   no final norm
    keel      x = N_post(alpha x + F(N_in(x))), alpha = 2L (the number of sublayers)    no final norm
    gemma4    x = s_l (h + N(MLP(N(h)))), h = x + N(Attn(N(x))); q, k RMSNorm per head (learned gains), v RMSNorm
              per head without gain, attention scale 1, embedding x sqrt(d), learnable s_l from 1    final N
    muse_glimmer  x = x + N0(F(N0(x))) with gain-centred norms N0 = (1 + w) x / rms(x) (post norms eps 1e-8);
              q, k RMSNorm per head without gain, q x 3.87; sigmoid gate per channel; embedding RMSNorm without gain
              final N (gain w from 1)

Norm removal (`pretrain remove-norms`, pretrain/removal/): with `model.removable_norms` the norms of a
`removable` scheme (pre_ln, lns, reordered; with model.qk_norm its q/k norms too) are `RemovableNorm` sites
(`RemovableRMSNorm` / `RemovableLayerNorm`, `RemovableHeadNorm` / `RemovableWidthNorm` for q/k), each of which can
switch from its live statistic to a fixed scale sigma; `REMOVAL_SITES` names the kinds of site, their schedule groups
and the weights (input columns, or output rows) into which a fixed site folds.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable

from models.parametrization import multipliers

if TYPE_CHECKING:
    # annotations only: models/config.py imports this module's tables, and torch at import would undo `layers()`
    from torch import nn
    from models.config import ModelConfig
    from models.parallel import TensorParallel


def layers() -> types.ModuleType:
    """models/norm_layers.py: the torch modules this table builds (its norms, and the parts of models/parts.py and
    models/parallel.py a scheme uses), imported when a model is built: the table itself is read by config
    validation and `pretrain --help`, which must not wait 1-2 s for torch."""
    import models.norm_layers  # torch: when a model is built (see the docstring)
    return models.norm_layers


# The DyT paper's LLaMA settings (its Table of alpha0 per model; repository other_tasks/LLaMA): width of the
# model -> (alpha0 of the attention-input DyT, alpha0 of the MLP-input and final DyT). Widths up to 4096 (the
# 7B model, the smallest the paper tunes) take the 7B values, up to 5120 the 13B ones, wider ones the 34B/70B ones.
DYT_LLAMA_ALPHA0 = ((4096, 0.8, 0.2), (5120, 0.6, 0.15), (math.inf, 0.2, 0.05))


def dyt_alpha_inits(cfg: ModelConfig) -> tuple[float, float]:
    """(attention-input alpha0, other alpha0): the config's values where given, else the paper's width rule."""
    attn, other = next((a, o) for width, a, o in DYT_LLAMA_ALPHA0 if cfg.d_model <= width)
    return (cfg.dyt_alpha_init_attn if cfg.dyt_alpha_init_attn is not None else attn,
            cfg.dyt_alpha_init if cfg.dyt_alpha_init is not None else other)


# The block's slots, a declared interface: `BlockParts` fills them, models/llama.py `Block` holds them under these
# attribute names (state-dict prefixes too), and diagnostics, depth analyses, attribution, HF conversion and norm
# removal read a block through them.
ATTN_IN, ATTN_OUT, ATTN_POST = "attn_norm", "attn_out_norm", "attn_post_norm"
MLP_IN, MLP_OUT, MLP_POST = "mlp_norm", "mlp_out_norm", "mlp_post_norm"
SLOTS = (ATTN_IN, ATTN_OUT, ATTN_POST, MLP_IN, MLP_OUT, MLP_POST)

# The attention's slots (models/llama.py `Attention`): q/k/v norms on q [B, T, H, E] and k, v [B, T, K, E] before RoPE,
# q/k scales on q [B, H, T, E] and k [B, K, T, E] after it, the output gate on the heads' output [B, T, H, E].
Q_NORM, K_NORM, V_NORM, Q_SCALE, K_SCALE, ATTN_GATE = "q_norm", "k_norm", "v_norm", "q_scale", "k_scale", "out_gate"
ATTENTION_SLOTS = (Q_NORM, K_NORM, V_NORM, Q_SCALE, K_SCALE, ATTN_GATE)
# The MLP's: scales on the gate and up projections' outputs [B, T, F] (nGPT's s_v, s_u).
MLP_GATE_SCALE, MLP_UP_SCALE = "gate_scale", "up_scale"
MLP_SLOTS = (MLP_GATE_SCALE, MLP_UP_SCALE)

NORM_TYPES = ("rmsnorm", "layernorm")  # model.norm_type (models/norm_layers.py NORM_CLASSES)
# model.norm_gain -> the constant added to every learnable norm gain w (output * (w + offset)); w starts at 1 - offset,
# so both start as the same model. zero_centered: Megatron's layernorm_zero_centered_gamma, Gemma / Qwen3-Next's
# (1 + w): weight decay on w (train.decay_norms_and_embeddings) then pulls the gain toward 1 instead of 0.
NORM_GAINS = {"one": 0.0, "zero_centered": 1.0}
NormFactory = Callable[[], "nn.Module"]
TPFactory = Callable[["TensorParallel | None"], "nn.Module"]  # parts that may be split with the heads


def _none() -> nn.Module:
    return layers().Identity()


def _identity(tp: TensorParallel | None = None) -> nn.Module:
    return layers().Identity()


def _ungated(tp: TensorParallel | None = None) -> nn.Module:
    return layers().Ungated()


def _residual(alpha: float) -> nn.Module:
    return layers().Residual(alpha)


@dataclass(frozen=True)
class BlockParts:
    """The swappable parts of one block: one factory per slot of `SLOTS` (see the module docstring for where each one
    sits), of `ATTENTION_SLOTS` and `MLP_SLOTS`, and the residual update (models/parts.py)."""

    attn_norm: NormFactory = _none
    attn_out_norm: NormFactory = _none
    attn_post_norm: NormFactory = _none
    mlp_norm: NormFactory = _none
    mlp_out_norm: NormFactory = _none
    mlp_post_norm: NormFactory = _none
    q_norm: TPFactory = _identity
    k_norm: TPFactory = _identity
    v_norm: TPFactory = _identity
    q_scale: TPFactory = _identity
    k_scale: TPFactory = _identity
    out_gate: TPFactory = _ungated
    gate_scale: TPFactory = _identity
    up_scale: TPFactory = _identity
    layer_scalar: NormFactory = _none  # on the block's output, after its last add (model.layer_scalar; Gemma 4)
    softmax_scale: float | None = None  # None: 1/sqrt(head_dim)
    residual: Callable[[float], nn.Module] = _residual  # (residual_alpha) -> the block's residual update
    residual_alpha: float = 1.0
    branch_scale: float = 1.0  # the residual update adds branch_scale * F (a parametrization's branch multiplier)
    post_norm: bool = False  # the block normalizes after its residual adds (model.gpas scales the shortcut then)
    # Multipliers of model.init_std for the block's weights.
    init_gain_qkv: float = 1.0  # all of q, k, v (v also gets init_gain_value)
    init_gain_value: float = 1.0
    init_gain_attn_out: float = 1.0
    init_gain_gate: float = 1.0
    init_gain_up: float = 1.0
    init_gain_mlp_out: float = 1.0
    layer: int = 0  # the block these are the parts of, 1..L (`block_parts` sets it; hyper-connections' init reads it)


@dataclass(frozen=True)
class HFExport:
    """A stock transformers class a scheme exports to (models/hf/): its config's `model_type`, and what the export
    does on the way (shown in docs/interop.md's export table)."""

    model_type: str  # llama, qwen3, olmo2 (models/hf/choose.py TARGETS)
    how: str = "as is"


NO_STOCK_CLASS = "no stock transformers class computes it"


@dataclass(frozen=True)
class NormScheme:
    """Everything the project knows about one scheme: `block` and `final_norm` are required, every other fact has a
    default that fits a new design (no embedding or logit part, model.init_std, no composable keys, not removable,
    no paper-fixed training settings, no stock transformers class)."""

    block: Callable[[ModelConfig, int], BlockParts]  # (config, l in 1..L) -> parts of block l
    final_norm: Callable[[ModelConfig], nn.Module]
    removable: bool = False  # `pretrain remove-norms` can fine-tune its norms away (its sites: REMOVAL_SITES)
    # ... also by TaperNorm (model.taper_norms, `remove-norms --method taper`): its norms all read the residual
    # stream and fold into the input columns of the next linear (the paper's pre-norm setting)
    taperable: bool = False
    norm_free: bool = False  # no norm anywhere: the residual stream is the sum of embedding and branch outputs
    unit_embedding: bool = False  # an untied token embedding starts at variance 1 instead of model.init_std^2
    embedding: Callable[[ModelConfig], nn.Module] = lambda cfg: layers().Identity()  # on the token embedding's output
    # (the model's `emb_out`: dyt/derf's learnable scalar, peri_ln's norm)
    logit_scale: Callable[[ModelConfig, "TensorParallel | None"], nn.Module] = lambda cfg, tp: layers().Identity()
    init_std: Callable[[ModelConfig], float] | None = None  # the paper's std where model.init_std is null (0.02)
    # Weights kept on the unit sphere after every optimizer step: {name suffix: dim whose vectors have norm 1}.
    unit_weights: dict[str, int] = field(default_factory=dict)
    # The composable model keys (`OPTIONS`) this scheme takes; any other set off its default is refused.
    options: frozenset[str] = frozenset()
    # Training settings its paper fixes, (config) -> {dotted config key: value}, used where the config does not choose
    # the key for this scheme (a chosen other value is trained as given, with a warning; pretrain/config/loading.py).
    train_defaults: Callable[[ModelConfig], dict[str, object]] = lambda cfg: {}
    # The stock transformers class each model.qk_norm value exports to (models/hf/); every other value is refused
    # with `no_hf_class`: one reason, or {qk_norm value: reason} with the scheme's reason under "any".
    hf_exports: dict[str, HFExport] = field(default_factory=dict)
    no_hf_class: str | dict[str, str] = NO_STOCK_CLASS

    def why_no_hf_class(self, qk_norm: str) -> str:
        if isinstance(self.no_hf_class, str):
            return self.no_hf_class
        return self.no_hf_class.get(qk_norm, self.no_hf_class.get("any", NO_STOCK_CLASS))


def embedding_init_gain(cfg: ModelConfig) -> float:
    """Multiplier of model.init_std for the token embedding (see `unit_embedding`)."""
    unit = NORM_SCHEMES[cfg.norm_scheme].unit_embedding and not cfg.tie_embeddings
    return 1.0 / cfg.weight_std if unit else 1.0


@dataclass(frozen=True)
class RemovalSite:
    """A kind of norm site of norm removal: where the norm sits and where its fixed scale folds (pretrain/removal/)."""

    module: str  # the norm module's name in a block (`blocks.i.` + it), or at the top (the final norm)
    group: str  # its schedule group (removal.order)
    weights: tuple[str, ...]  # the weights the fold multiplies by the site's per-channel scale
    # "columns": the input columns of the weights that read the norm's output; "rows": the output rows of the weight
    # whose output the norm reads (q/k norms sit before RoPE and post-sublayer norms after the output projection, so
    # a constant per-channel scale there is one of the projection's rows); "q_rows" / "k_rows": the q (k) rows of the
    # fused qkv weight ([kv heads, q per kv + 2, head_dim] rows: q_1..q_Q, k, v per kv head).
    fold: str
    top: bool = False  # a model-level norm (no block prefix)


# Norm removal: every kind of site, in the order the sites of one block are switched within a group. A scheme's
# removable sites are those of its norms that are `RemovableNorm` (a slot it fills; models/removal.py finds them); a new
# site is a new entry here.
REMOVAL_SITES: dict[str, RemovalSite] = {
    "mlp_in": RemovalSite(MLP_IN, "mlp", ("mlp.gate.weight", "mlp.up.weight"), "columns"),
    "mlp_out": RemovalSite(MLP_OUT, "mlp", ("mlp.down.weight",), "rows"),  # reordered
    "attn_in": RemovalSite(ATTN_IN, "attn", ("attn.qkv.weight",), "columns"),
    "attn_out": RemovalSite(ATTN_OUT, "attn", ("attn.o.weight",), "rows"),  # reordered
    "q": RemovalSite(f"attn.{Q_NORM}", "qk", ("attn.qkv.weight",), "q_rows"),  # model.qk_norm
    "k": RemovalSite(f"attn.{K_NORM}", "qk", ("attn.qkv.weight",), "k_rows"),
    "final": RemovalSite("final_norm", "final", ("head.weight",), "columns", top=True),
}
REMOVAL_GROUPS = tuple(dict.fromkeys(site.group for site in REMOVAL_SITES.values()))  # mlp, attn, qk, final


def norm(cfg: ModelConfig, scale: float = 1.0, gain: str | None = None, eps: float | None = None) -> NormFactory:
    """The run's norm over d_model; `gain` (a `NORM_GAINS` key) and `eps` where a scheme fixes them (muse_glimmer)."""
    classes = (layers().TAPER_NORM_CLASSES if cfg.taper_norms else
               layers().REMOVABLE_NORM_CLASSES if cfg.removable_norms else layers().NORM_CLASSES)
    cls = classes[cfg.norm_type]
    offset = NORM_GAINS[cfg.norm_gain if gain is None else gain]
    eps = cfg.norm_eps if eps is None else eps
    return lambda: cls(cfg.d_model, eps, output_scale=scale, gain_offset=offset)


def scaleless_norm(dim: int, eps: float, factor: float = 1.0) -> TPFactory:
    """RMSNorm over the last dim `dim` without a gain, times a fixed factor (v, scaleless q/k, Muse's embedding)."""
    return lambda tp=None: layers().ScalelessRMSNorm(dim, eps, factor)


def head_norm(cfg: ModelConfig, heads: int | None = None) -> TPFactory:
    """The run's norm over head_dim, one gain shared by the heads (replicated under TP); with
    `model.removable_norms` a removal site with one sigma for each of the model's `heads` (q or k heads)."""
    gain_offset, centred = NORM_GAINS[cfg.norm_gain], cfg.norm_type == "layernorm"
    if cfg.removable_norms:
        return lambda tp: layers().RemovableHeadNorm(cfg.head_dim, cfg.norm_eps, centred, tp, heads,
                                                     gain_offset=gain_offset)
    return lambda tp: layers().HeadNorm(cfg.head_dim, cfg.norm_eps, centred, tp, gain_offset=gain_offset)


def width_norm(cfg: ModelConfig, heads: int) -> TPFactory:
    """The run's norm over heads * head_dim, its gain split with the heads and its statistics summed over TP."""
    cls = layers().RemovableWidthNorm if cfg.removable_norms else layers().WidthNorm
    return lambda tp: cls(heads * cfg.head_dim, cfg.norm_eps, cfg.norm_type == "layernorm", tp,
                          gain_offset=NORM_GAINS[cfg.norm_gain])


def dyt(cfg: ModelConfig, alpha_init: float) -> NormFactory:
    return lambda: layers().DyT(cfg.d_model, alpha_init, bias=cfg.dyt_bias, gain_offset=NORM_GAINS[cfg.norm_gain])


def derf(cfg: ModelConfig, alpha_init: float) -> NormFactory:
    return lambda: layers().Derf(cfg.d_model, alpha_init, gain_offset=NORM_GAINS[cfg.norm_gain])


def _pre_ln(cfg: ModelConfig, layer: int) -> BlockParts:
    return BlockParts(attn_norm=norm(cfg), mlp_norm=norm(cfg))


def _lns(cfg: ModelConfig, layer: int) -> BlockParts:
    # LayerNorm Scaling (Sun et al., 2025): both norm outputs of block l are multiplied by 1/sqrt(l).
    scaled = norm(cfg, scale=1.0 / math.sqrt(layer))
    return BlockParts(attn_norm=scaled, mlp_norm=scaled)


def _ln_free(cfg: ModelConfig, layer: int) -> BlockParts:
    # Without any norm the residual stream grows with every branch added to it; scaling the init of the
    # two branch output projections by 1/sqrt(2L) (GPT-2 / Megatron "scaled init") keeps its variance
    # O(1) at initialization. That alone does not keep training stable at depth: Adam moves every weight by
    # about lr per step whatever its size, SwiGLU is quadratic in its input, and 16 blocks compound the
    # growth until the residual stream explodes (lr 2e-3: loss 7e8, exit 3). Depth-muP for Adam (Yang et al.,
    # "Tensor Programs VI") keeps each block's update effect at 1/L: branch weights learn at lr / sqrt(L) and
    # the branch output is scaled down on top. Here that is emulated with fixed multipliers (no parameter, no
    # statistic), calibrated at base depth B: each branch reads c_in * x and adds c_out * F, c_in = sqrt(B/L),
    # c_out = B/L (capped at 1), with the init divided by the same constants so the model at step 0 is
    # unchanged; under Adam a fixed multiplier c on a weight is that weight's learning rate times c. Those are
    # entries of the parametrization table (models/parametrization.py `ln_free_multipliers`), which `block_parts`
    # applies as it applies CompleteP's; under completep the scaled init reads the base depth (CompleteP's 1/L does
    # the depth).
    gain = 1.0 / math.sqrt(2 * multipliers(cfg).scheme_depth)
    return BlockParts(init_gain_attn_out=gain, init_gain_mlp_out=gain)


def _post_ln(cfg: ModelConfig, layer: int) -> BlockParts:
    return BlockParts(attn_post_norm=norm(cfg), mlp_post_norm=norm(cfg), post_norm=True)


def _mix_ln(cfg: ModelConfig, layer: int) -> BlockParts:
    n_post = math.floor(cfg.mix_ln_post_fraction * cfg.n_layers)
    return _post_ln(cfg, layer) if layer <= n_post else _pre_ln(cfg, layer)


def _peri_ln(cfg: ModelConfig, layer: int) -> BlockParts:
    return BlockParts(attn_norm=norm(cfg), attn_out_norm=norm(cfg), mlp_norm=norm(cfg), mlp_out_norm=norm(cfg))


def _embedding_norm(cfg: ModelConfig) -> nn.Module:
    # Peri-LN normalizes every module's output before it joins the residual, the embedding's too (OLMo-core's
    # embedding_norm; Gemma's sqrt(d) multiplier gives the same unit scale only at its widths): otherwise the embedding
    # (std model.init_std) starts ~50 times smaller than each of the 2L unit-RMS sublayer outputs added to it, and the
    # tokens are drowned out for the first ~100 steps (docs/schemes.md, "Peri-LN as its paper trains it").
    return norm(cfg)()


def _reordered(cfg: ModelConfig, layer: int) -> BlockParts:
    # OLMo 2 (transformers Olmo2DecoderLayer): no norm on the sublayer inputs; each sublayer's output is normalized
    # before it joins the residual (post_attention_layernorm, post_feedforward_layernorm); final norm. OLMo 2 pairs
    # it with full-width QK-norm: model.qk_norm=full.
    return BlockParts(attn_out_norm=norm(cfg), mlp_out_norm=norm(cfg))


def _deepnorm(cfg: ModelConfig, layer: int) -> BlockParts:
    # DeepNet (Wang et al., 2022), decoder-only constants. DeepNet scales the value and output projections and
    # the FFN's two matrices by beta, so that each branch starts at ~beta^2 of its unscaled size. SwiGLU's
    # down(silu(gate x) * up x) has three: up is the FFN's first matrix (the path whose values pass through,
    # linear in x like v) and down its second; gate only decides how much passes (like q/k in attention) and
    # keeps gain 1. Scaling all three would start the MLP branch near beta^3.
    beta = (8 * cfg.n_layers) ** -0.25
    return BlockParts(
        attn_post_norm=norm(cfg),
        mlp_post_norm=norm(cfg),
        post_norm=True,
        residual_alpha=(2 * cfg.n_layers) ** 0.25,
        init_gain_value=beta,
        init_gain_attn_out=beta,
        init_gain_up=beta,
        init_gain_mlp_out=beta,
    )


def _keel(cfg: ModelConfig, layer: int) -> BlockParts:
    # Keel (Chen & Wei, 2026, arXiv 2601.19895): Post-LN whose ResNet shortcut is replaced by a Highway-style scaled
    # one, x_{l+1} = LN_1(alpha x_l + F(LN_2(x_l))), alpha = L the number of sublayers (attention and MLP each one:
    # 2 n_layers here), every norm an RMSNorm with a learnable gain; no special initialization (model.init_std).
    return BlockParts(attn_norm=norm(cfg), mlp_norm=norm(cfg), attn_post_norm=norm(cfg), mlp_post_norm=norm(cfg),
                      post_norm=True, residual_alpha=2.0 * cfg.n_layers)


def _gemma4(cfg: ModelConfig, layer: int) -> BlockParts:
    # transformers Gemma4TextDecoderLayer: input_layernorm -> attention -> post_attention_layernorm -> + x;
    # pre_feedforward_layernorm -> MLP -> post_feedforward_layernorm -> + h; then the whole stream times the layer's
    # `layer_scalar`. Gemma4TextAttention: q_norm, k_norm RMSNorm per head over head_dim with a gain (Gemma4RMSNorm's
    # gain is w, from 1), v_norm RMSNorm per head without one, before RoPE; scaling 1.0.
    q, k = QK_NORM_SCALES["learned"](cfg)
    return replace(_peri_ln(cfg, layer), q_norm=q, k_norm=k, v_norm=scaleless_norm(cfg.head_dim, cfg.norm_eps),
                   softmax_scale=1.0, layer_scalar=layers().LayerScalar)


def _gemma4_embedding(cfg: ModelConfig) -> nn.Module:
    # Gemma4TextScaledWordEmbedding: the lookup times sqrt(hidden_size), a fixed multiplier.
    return layers().Scale(math.sqrt(cfg.d_model))


# Muse Glimmer's released text config (transformers MuseGlimmerTextConfig): the constant q factor after its scaleless
# q/k norm (on top of 1/sqrt(head_dim)) and the epsilon of its post-sublayer norms.
MUSE_QK_SCALE_FACTOR = 3.87
MUSE_POST_NORM_EPS = 1e-8


def _muse_glimmer(cfg: ModelConfig, layer: int) -> BlockParts:
    # transformers MuseGlimmerTextDecoderLayer: every block norm a MuseGlimmerTextCenteredRMSNorm, (1 + w) x / rms(x)
    # with w from 0, the post-sublayer ones with post_norm_eps; MuseGlimmerTextAttention: one RMSNorm without gain on q
    # and k per head (q then times qk_scale_factor), scaling 1/sqrt(head_dim), the heads' output times
    # sigmoid(gate_proj(x)) per channel before o_proj.
    q, k = QK_NORM_SCALES["none"](cfg)
    centred = dict(gain="zero_centered")
    return BlockParts(attn_norm=norm(cfg, **centred), mlp_norm=norm(cfg, **centred),
                      attn_out_norm=norm(cfg, eps=MUSE_POST_NORM_EPS, **centred),
                      mlp_out_norm=norm(cfg, eps=MUSE_POST_NORM_EPS, **centred),
                      q_norm=q, k_norm=k, out_gate=ATTN_GATES["elementwise"](cfg))


def _muse_embedding(cfg: ModelConfig) -> nn.Module:
    # MuseGlimmerTextNormedEmbedding: an RMSNorm without gain on the lookup (eps rms_norm_eps).
    return scaleless_norm(cfg.d_model, cfg.norm_eps)()


def _muse_final_norm(cfg: ModelConfig) -> nn.Module:
    # MuseGlimmerTextModel.norm: a plain RMSNorm, gain w from 1 (not gain-centred).
    return norm(cfg, gain="one")()


def hybridnorm_init_std(cfg: ModelConfig) -> float:
    # HybridNorm's OLMo configs (init_fn full_megatron): std sqrt(2 / (5 d)) (the "small init" of Nguyen & Salazar),
    # the attention and FFN output projections divided by sqrt(2 L).
    return math.sqrt(2.0 / (5.0 * cfg.d_model))


def _hybridnorm(cfg: ModelConfig, layer: int, star: bool = False) -> BlockParts:
    # HybridNorm (Zhuo et al., 2025; BryceZhuo/HybridNorm olmo/model.py): q, k and v each normalized per head before
    # RoPE (one gain over head_dim each), no norm before attention, Y = X + Attn(QKVNorm(X)); then the FFN around the
    # normalized sum, X' = N(Y) + FFN(N(Y)): our attention post-norm. HybridNorm* makes block 1 a Pre-Norm block that
    # keeps its QKV norms: Y = X + Attn(QKVNorm(N(X))), X' = Y + FFN(N(Y)).
    out = 1.0 / math.sqrt(2 * cfg.n_layers)
    common = dict(q_norm=head_norm(cfg), k_norm=head_norm(cfg), v_norm=head_norm(cfg),
                  init_gain_attn_out=out, init_gain_mlp_out=out)
    if star and layer == 1:
        return BlockParts(attn_norm=norm(cfg), mlp_norm=norm(cfg), **common)
    return BlockParts(attn_post_norm=norm(cfg), **common)


def _hybridnorm_star(cfg: ModelConfig, layer: int) -> BlockParts:
    return _hybridnorm(cfg, layer, star=True)


def _dyt(cfg: ModelConfig, layer: int) -> BlockParts:
    # The DyT paper's LLaMA: its own alpha0 for the DyT before attention, another for the others (before the MLP,
    # and the final one).
    attn, other = dyt_alpha_inits(cfg)
    return BlockParts(attn_norm=dyt(cfg, attn), mlp_norm=dyt(cfg, other))


def _final_dyt(cfg: ModelConfig) -> nn.Module:
    return dyt(cfg, dyt_alpha_inits(cfg)[1])()


def _derf(cfg: ModelConfig, layer: int) -> BlockParts:
    # Derf's per-site alpha0 (attention input, FFN input, final), as DyT's: the same config keys and width rule.
    attn, other = dyt_alpha_inits(cfg)
    return BlockParts(attn_norm=derf(cfg, attn), mlp_norm=derf(cfg, other))


def _final_derf(cfg: ModelConfig) -> nn.Module:
    return derf(cfg, dyt_alpha_inits(cfg)[1])()


# The DyT paper's smallest LLaMA (7B): the width up to which DYT_LLAMA_ALPHA0 takes its values.
DYT_LLAMA_REFERENCE_WIDTH = 4096


def dyt_embedding_scale_init(cfg: ModelConfig) -> float:
    # DyT's LLaMA (fms_fsdp models/llama.py shared_scale) and Derf's nanoGPT patch multiply the token embedding by a
    # learnable scalar from sqrt(d): with weights at std 0.02 its output has std 0.02 sqrt(d), 1.28 at the 7B width,
    # the operating point the paper's alpha0 are tuned for. Below 4096, where the paper has no model and we take the
    # 7B alpha0 (DYT_LLAMA_ALPHA0), the scalar starts at sqrt(4096) to keep that operating point: from sqrt(d) every
    # DyT/Derf model here stayed at the unigram level (docs/schemes.md, "DyT as its paper trains it").
    return math.sqrt(max(cfg.d_model, DYT_LLAMA_REFERENCE_WIDTH))


def _embedding_scale(cfg: ModelConfig) -> nn.Module:
    return layers().EmbeddingScale(dyt_embedding_scale_init(cfg))


def _ngpt(cfg: ModelConfig, layer: int) -> BlockParts:
    # nGPT (Loshchilov et al., 2024; NVIDIA/ngpt model.py): no input norms; each sublayer's output is projected on the
    # sphere (L2Norm) and the residual moves toward it by the eigen learning rates (NGPTResidual); q and k normalized
    # per head and scaled by s_qk (init 1, scaling 1/sqrt(d)) after RoPE, softmax scale sqrt(head_dim); SwiGLU's two
    # projections scaled by s_u, s_v (init 1, scaling 1) times sqrt(d). s_qk is one vector for q and one for k (as in
    # OLMo-core; NVIDIA/ngpt shares one, which needs n_kv_heads = n_heads), equal at init.
    d, E = cfg.d_model, cfg.head_dim
    scaling = d ** -0.5
    return BlockParts(
        attn_out_norm=layers().L2Norm, mlp_out_norm=layers().L2Norm,
        q_scale=lambda tp: layers().UnitScaled(
            layers().SplitScale(cfg.n_heads * E, 1.0, scaling, tp, shape=(-1, 1, E))),
        k_scale=lambda tp: layers().UnitScaled(
            layers().SplitScale(cfg.n_kv_heads * E, 1.0, scaling, tp, shape=(-1, 1, E))),
        softmax_scale=math.sqrt(E),
        gate_scale=lambda tp: layers().SplitScale(cfg.ffn_hidden, 1.0, 1.0, tp, multiplier=math.sqrt(d)),
        up_scale=lambda tp: layers().SplitScale(cfg.ffn_hidden, 1.0, 1.0, tp, multiplier=math.sqrt(d)),
        residual=lambda alpha: layers().NGPTResidual(d),
    )


def _ngpt_logit_scale(cfg: ModelConfig, tp: TensorParallel | None) -> nn.Module:
    # s_z (init 1, scaling 1/sqrt(d)) per vocabulary entry, split with the head's rows.
    return layers().SplitScale(cfg.vocab_size, 1.0, cfg.d_model ** -0.5, tp)


# NVIDIA/ngpt launcher.sh trains nGPT at d 1024 with lr 3e-3 and no warm-up (OLMo-core's example: no warm-up either).
NGPT_REFERENCE = (1024, 3e-3)


def ngpt_train_defaults(cfg: ModelConfig) -> dict[str, object]:
    # nGPT's scalars (s_z, s_qk, the eigen learning rates) are stored at 1/sqrt(d) of their effective value, so one Adam
    # step moves the effective value by about lr * sqrt(d): 0.096 at the launcher's width and lr. The logits are s_z
    # times a cosine and need s_z near 10, so a narrower model at the same lr takes hundreds of steps to leave the
    # unigram level (docs/schemes.md, "nGPT's learning rate"). The default holds that effective step at every width:
    # lr = 3e-3 * sqrt(1024 / d), 8.5e-3 at the tiny width 128, 2.1e-3 at 2048.
    width, lr = NGPT_REFERENCE
    return {"train.lr": float(f"{lr * math.sqrt(width / cfg.d_model):.3g}"), "train.warmup_steps": 0}


# nGPT's unit-norm weights (NVIDIA/ngpt train.py normalize_matrices): the vectors along the embedding dimension. Every
# matrix's d_model dim is whole on each tensor-parallel rank.
NGPT_UNIT_WEIGHTS = {"tok_emb.weight": 1, "head.weight": 1, "attn.qkv.weight": 1, "attn.o.weight": 0,
                     "mlp.gate.weight": 1, "mlp.up.weight": 1, "mlp.down.weight": 0}


def _final_norm(cfg: ModelConfig) -> nn.Module:
    return norm(cfg)()


def _no_final_norm(cfg: ModelConfig) -> nn.Module:
    return layers().Identity()


# ---------------------------------------------------------------------------------------------------------------------
# Composable keys: each one rewrites a scheme's parts, for the schemes whose `options` name it.

# model.qk_norm -> (q norm, k norm) of every block's attention before RoPE (the q_norm / k_norm slots).
QK_NORMS: dict[str, Callable[[ModelConfig], tuple[TPFactory, TPFactory]]] = {
    "none": lambda cfg: (_identity, _identity),
    "head": lambda cfg: (head_norm(cfg, cfg.n_heads), head_norm(cfg, cfg.n_kv_heads)),  # Qwen3 / Gemma 3: over
    # head_dim, one gain for all heads
    "full": lambda cfg: (width_norm(cfg, cfg.n_heads), width_norm(cfg, cfg.n_kv_heads)),  # OLMo 2: whole width
}
# model.attn_gate -> the attention's output gate (the out_gate slot).
ATTN_GATES: dict[str, Callable[[ModelConfig], TPFactory]] = {
    "none": lambda cfg: _ungated,
    "headwise": lambda cfg: lambda tp: layers().AttentionGate(cfg.d_model, cfg.n_heads, cfg.head_dim, False, tp),
    "elementwise": lambda cfg: lambda tp: layers().AttentionGate(cfg.d_model, cfg.n_heads, cfg.head_dim, True, tp),
}


# model.qk_norm_scale -> (q norm, k norm) per head and the attention's softmax scale: what the per-head q/k norms
# carry (null, the default: model.qk_norm's norms with a learned gain at 1/sqrt(head_dim)).
QK_NORM_SCALES: dict[str, Callable[[ModelConfig], tuple[TPFactory, TPFactory]]] = {
    # Gemma 4: learned gains, attention scale 1 (the gains learn the temperature)
    "learned": lambda cfg: (head_norm(cfg, cfg.n_heads), head_norm(cfg, cfg.n_kv_heads)),
    # Muse Glimmer: no gain; q times the constant MUSE_QK_SCALE_FACTOR, attention scale 1/sqrt(head_dim)
    "none": lambda cfg: (scaleless_norm(cfg.head_dim, cfg.norm_eps, MUSE_QK_SCALE_FACTOR),
                         scaleless_norm(cfg.head_dim, cfg.norm_eps)),
}
QK_SOFTMAX_SCALES: dict[str, float | None] = {"learned": 1.0, "none": None}


def _with_qk_norm(cfg: ModelConfig, parts: BlockParts) -> BlockParts:
    q, k = QK_NORMS[cfg.qk_norm](cfg)
    return replace(parts, q_norm=q, k_norm=k)


def _with_qk_norm_scale(cfg: ModelConfig, parts: BlockParts) -> BlockParts:
    # after _with_qk_norm (OPTIONS' order), which ModelConfig requires to be model.qk_norm=head
    q, k = QK_NORM_SCALES[cfg.qk_norm_scale](cfg)
    return replace(parts, q_norm=q, k_norm=k, softmax_scale=QK_SOFTMAX_SCALES[cfg.qk_norm_scale])


def _with_v_norm(cfg: ModelConfig, parts: BlockParts) -> BlockParts:
    return replace(parts, v_norm=scaleless_norm(cfg.head_dim, cfg.norm_eps))


def _with_layer_scalar(cfg: ModelConfig, parts: BlockParts) -> BlockParts:
    return replace(parts, layer_scalar=layers().LayerScalar)


def _with_gate(cfg: ModelConfig, parts: BlockParts) -> BlockParts:
    return replace(parts, out_gate=ATTN_GATES[cfg.attn_gate](cfg))


def _with_gpas(cfg: ModelConfig, parts: BlockParts) -> BlockParts:
    return replace(parts, residual=lambda alpha: layers().GPAS(alpha, shortcut=parts.post_norm))


# model.residual -> the block's residual update on a state of streams (models/streams.py), the model's expansion of the
# embedding into the state and its collapse before the final norm; "single" is the scheme's own one-stream update.
RESIDUAL_STREAMS_DEFAULT = 4  # DeepseekV4Config.hc_mult
SINKHORN_ITERS_DEFAULT = 20  # DeepseekV4Config.hc_sinkhorn_iters
ATTN_RES_BLOCKS_DEFAULT = 8  # Block AttnRes: "with ~8 blocks it recovers most of Full AttnRes's gains"
SIAMESE_STREAMS = 2


def residual_streams(cfg: ModelConfig) -> int:
    """n, what model.residual_streams sets: 1 for single, SiameseNorm's 2, the number of blocks N of attn_res (null:
    8, or L where the model has fewer layers), the streams of mhc/hc/hc_static (null: 4)."""
    if cfg.residual == "single":
        return 1
    if cfg.residual == "siamese":
        return SIAMESE_STREAMS
    if cfg.residual_streams is not None:
        return cfg.residual_streams
    return min(ATTN_RES_BLOCKS_DEFAULT, cfg.n_layers) if cfg.residual == "attn_res" else RESIDUAL_STREAMS_DEFAULT


@dataclass(frozen=True)
class ResidualEntry:
    """One model.residual value: (config, the block's parts) -> the block's residual factory, and (config) -> the
    model's `streams_in` and `streams_out`."""

    residual: Callable[[ModelConfig, BlockParts], Callable[[float], nn.Module]]
    expand: Callable[[ModelConfig], nn.Module]
    collapse: Callable[[ModelConfig], nn.Module]
    # Whether the state's slots are streams running side by side, each a residual stream of its own (the per-stream
    # diagnostics measure them); Block AttnRes's slots are the embedding and the finished blocks' sums, a history.
    parallel_streams: bool = True


def _copies(cfg: ModelConfig) -> nn.Module:
    return layers().StreamExpand(residual_streams(cfg))


RESIDUAL_ENTRIES: dict[str, ResidualEntry] = {
    "single": ResidualEntry(lambda cfg, parts: parts.residual, lambda cfg: layers().Identity(),
                            lambda cfg: layers().Identity()),
    "mhc": ResidualEntry(
        lambda cfg, parts: lambda alpha: layers().MHCResidual(
            cfg.d_model, residual_streams(cfg), cfg.residual_sinkhorn_iters or SINKHORN_ITERS_DEFAULT, cfg.norm_eps),
        _copies, lambda cfg: layers().MHCHead(cfg.d_model, residual_streams(cfg), cfg.norm_eps)),
    "hc": ResidualEntry(
        lambda cfg, parts: lambda alpha: layers().HCResidual(cfg.d_model, residual_streams(cfg), parts.layer, True),
        _copies, lambda cfg: layers().StreamSum()),
    "hc_static": ResidualEntry(
        lambda cfg, parts: lambda alpha: layers().HCResidual(cfg.d_model, residual_streams(cfg), parts.layer, False),
        _copies, lambda cfg: layers().StreamSum()),
    "attn_res": ResidualEntry(
        lambda cfg, parts: lambda alpha: layers().AttnResResidual(
            cfg.d_model, cfg.norm_eps, parts.layer, cfg.n_layers // residual_streams(cfg)),
        lambda cfg: layers().AttnResExpand(residual_streams(cfg)),
        lambda cfg: layers().AttnResHead(cfg.d_model, cfg.norm_eps), parallel_streams=False),
    "siamese": ResidualEntry(
        lambda cfg, parts: lambda alpha: layers().SiameseResidual(norm(cfg), parts.layer),
        _copies, lambda cfg: layers().SiameseHead(norm(cfg))),
}
RESIDUALS = tuple(RESIDUAL_ENTRIES)


def measured_streams(cfg: ModelConfig) -> int:
    """How many streams the per-stream diagnostics measure: the state's n where its slots are side-by-side streams,
    else 1 (none: one stream, or attn_res, whose slots are earlier blocks' outputs)."""
    return residual_streams(cfg) if RESIDUAL_ENTRIES[cfg.residual].parallel_streams else 1


def _with_streams(cfg: ModelConfig, parts: BlockParts) -> BlockParts:
    return replace(parts, residual=RESIDUAL_ENTRIES[cfg.residual].residual(cfg, parts))


def stream_expand(cfg: ModelConfig) -> nn.Module:
    """The embedding's output into the residual state (the model's `streams_in`): nn.Identity for one stream."""
    return RESIDUAL_ENTRIES[cfg.residual].expand(cfg)


def stream_collapse(cfg: ModelConfig) -> nn.Module:
    """The residual state into the final norm's input (the model's `streams_out`): mHC's learned head, the streams'
    sum for hyper-connections, Block AttnRes's last depth attention, SiameseNorm's two norms' sum, nn.Identity for
    one stream."""
    return RESIDUAL_ENTRIES[cfg.residual].collapse(cfg)


@dataclass(frozen=True)
class Option:
    default: object
    apply: Callable[[ModelConfig, BlockParts], BlockParts]  # the block's parts with the option set
    refused: str = "not part of that design"  # why a scheme whose `options` lack the key refuses it (NOT_COMPOSABLE
    # gives a scheme's own reason)
    excludes: dict[str, str] = field(default_factory=dict)  # other keys it cannot be set with: {key: why}


# model key -> how it composes with a scheme's parts. norm_gain acts inside every norm factory (NORM_GAINS).
OPTIONS: dict[str, Option] = {
    "qk_norm": Option("none", _with_qk_norm),
    "attn_gate": Option("none", _with_gate),
    "gpas": Option(False, _with_gpas, refused="the GPAS paper stacks it on Pre-LN, LNS, Mix-LN, Sandwich and DeepNorm"),
    "norm_gain": Option("one", lambda cfg, parts: parts),
    "residual": Option(
        "single", _with_streams,
        refused="mHC (DeepSeek-V4), hyper-connections, Attention Residuals and SiameseNorm wrap Pre-Norm blocks",
        excludes={"gpas": "GPAS scales one residual stream; the streams' mix replaces that update"}),
    "qk_norm_scale": Option(None, _with_qk_norm_scale),
    "v_norm": Option(False, _with_v_norm),
    "layer_scalar": Option(False, _with_layer_scalar),
}


def block_parts(cfg: ModelConfig, layer: int) -> BlockParts:
    """The parts of block `layer` (1..L): the scheme's, rewritten by every composable key set off its default, then
    by the parametrization's forward multipliers (`with_multipliers`)."""
    parts = replace(NORM_SCHEMES[cfg.norm_scheme].block(cfg, layer), layer=layer)
    for key, option in OPTIONS.items():
        if getattr(cfg, key) != option.default:
            parts = option.apply(cfg, parts)
    return with_multipliers(cfg, parts)


def with_multipliers(cfg: ModelConfig, parts: BlockParts) -> BlockParts:
    """The table's forward multipliers (models/parametrization.py) in a block's parts: a branch multiplier is a
    parameter-free `Scale` in the branch's input or output slot where the scheme leaves it empty (what HF export
    folds), else a factor of the residual update (peri_ln's and reordered's output norms fill the slot); the attention
    scale where the scheme sets none; ln_free's init compensation. The width factors of the init are applied per
    parameter group by models/llama.py `init_weights`."""
    table = multipliers(cfg)
    changes: dict[str, object] = {}
    if parts.softmax_scale is None and table.softmax_scale is not None:
        changes["softmax_scale"] = table.softmax_scale
    if table.branch_in != 1.0:
        for slot in (ATTN_IN, MLP_IN):
            if getattr(parts, slot) is not _none:
                raise ValueError(f"model.norm_scheme={cfg.norm_scheme}: its {slot} slot is taken; a branch input "
                                 "multiplier has nowhere to go")
            changes[slot] = _scale(table.branch_in)
        if table.compensate_init:
            changes.update(init_gain_qkv=parts.init_gain_qkv / table.branch_in,
                           init_gain_gate=parts.init_gain_gate / table.branch_in,
                           init_gain_up=parts.init_gain_up / table.branch_in)
    if table.branch_out != 1.0:
        free = [slot for slot in (ATTN_OUT, MLP_OUT) if getattr(parts, slot) is _none]
        if len(free) == 2:
            changes.update({slot: _scale(table.branch_out) for slot in free})
        else:
            changes["branch_scale"] = parts.branch_scale * table.branch_out
        if table.compensate_init:
            changes.update(init_gain_attn_out=parts.init_gain_attn_out / table.branch_out,
                           init_gain_mlp_out=parts.init_gain_mlp_out / table.branch_out)
    return replace(parts, **changes) if changes else parts


def _scale(c: float) -> NormFactory:
    return lambda: layers().Scale(c)


def option_refusal(cfg: ModelConfig) -> str | None:
    """Why `cfg` sets a composable key its scheme does not take (one line), or None."""
    for key, option in OPTIONS.items():
        value = getattr(cfg, key)
        if value != option.default and key not in NORM_SCHEMES[cfg.norm_scheme].options:
            takers = [name for name, scheme in NORM_SCHEMES.items() if key in scheme.options]
            return (f"model.{key}={value} does not compose with model.norm_scheme={cfg.norm_scheme} "
                    f"({refusal_reason(cfg.norm_scheme, key)}); it composes with {', '.join(takers)}")
        for other, why in option.excludes.items() if value != option.default else ():
            if getattr(cfg, other) != OPTIONS[other].default:
                return (f"model.{key}={value} does not compose with model.{other}={getattr(cfg, other)} ({why}); "
                        f"leave one of them at its default")
    return None


def refusal_reason(scheme: str, key: str) -> str:
    return NOT_COMPOSABLE.get((scheme, key), OPTIONS[key].refused)


_NORMED = frozenset({"qk_norm", "attn_gate", "norm_gain", "qk_norm_scale", "v_norm", "layer_scalar"})
_GPAS = _NORMED | {"gpas"}
_PRE_NORM = _GPAS | {"residual"}  # mHC, hyper-connections, AttnRes, SiameseNorm: Pre-Norm blocks (models/streams.py)
# Why a scheme refuses a key (docs/schemes.md, "Composable keys").
NOT_COMPOSABLE = {
    ("ln_free", "qk_norm"): "norm-free by definition",
    ("ln_free", "norm_gain"): "it has no norm gains",
    ("hybridnorm", "qk_norm"): "it normalizes q, k and v itself",
    ("hybridnorm_star", "qk_norm"): "it normalizes q, k and v itself",
    ("ngpt", "qk_norm"): "it normalizes q and k itself",
    ("ngpt", "norm_gain"): "it has no norm gains",
    ("ngpt", "attn_gate"): "its residual update is on the sphere; the paper has no gate",
    ("hybridnorm", "v_norm"): "it normalizes v itself, with a gain",
    ("hybridnorm_star", "v_norm"): "it normalizes v itself, with a gain",
    ("gemma4", "qk_norm"): "it normalizes q and k per head itself",
    ("gemma4", "qk_norm_scale"): "its q/k norms carry learned gains at attention scale 1 by definition",
    ("gemma4", "v_norm"): "it normalizes v per head itself",
    ("gemma4", "layer_scalar"): "it has Gemma 4's layer scalar built in",
    ("muse_glimmer", "qk_norm"): "it normalizes q and k per head itself",
    ("muse_glimmer", "qk_norm_scale"): "its q/k norms are scaleless with q times 3.87 by definition",
    ("muse_glimmer", "attn_gate"): "it gates each head's output per channel itself",
    ("muse_glimmer", "norm_gain"): "its block norms are gain-centred, (1 + w), by definition",
}


_FULL_QK_ONLY_OLMO2 = ("full-width q/k norms come only with OLMo 2's reordered blocks; Qwen3's are per head "
                       "(model.qk_norm=head)")
_NO_VALUE_NORM = "it normalizes v per head and feeds the FFN a post-norm sum, which no stock class does"

NORM_SCHEMES: dict[str, NormScheme] = {
    "pre_ln": NormScheme(
        _pre_ln, _final_norm, removable=True, taperable=True, options=_PRE_NORM,
        hf_exports={"none": HFExport("llama"), "head": HFExport("qwen3")},
        no_hf_class={"full": _FULL_QK_ONLY_OLMO2}),
    "lns": NormScheme(
        _lns, _final_norm, removable=True, taperable=True, options=_GPAS,
        hf_exports={"none": HFExport("llama", "1/√l folded into the norm gains"),
                    "head": HFExport("qwen3", "1/√l folded into the block norm gains")},
        no_hf_class={"full": _FULL_QK_ONLY_OLMO2}),
    "ln_free": NormScheme(
        _ln_free, _no_final_norm, norm_free=True, unit_embedding=True, options=frozenset({"attn_gate"}),
        hf_exports={"none": HFExport("llama", "norms made linear (rms_norm_eps 2^40, every gain 2^20); c_in, c_out "
                                              "folded into q/k/v, gate, up and o, down")}),
    "post_ln": NormScheme(
        _post_ln, _no_final_norm, options=_NORMED,
        no_hf_class="it normalizes after the residual add, which no stock class does"),
    "mix_ln": NormScheme(
        _mix_ln, _final_norm, options=_GPAS,
        no_hf_class="its first blocks are Post-LN (normalized after the residual add), which no stock class has"),
    "peri_ln": NormScheme(
        _peri_ln, _final_norm, embedding=_embedding_norm, options=_GPAS,
        no_hf_class="it normalizes the embedding's output, which no stock class does (Gemma 2/3 have its block "
                    "norms but scale the embedding by √d)"),
    "reordered": NormScheme(
        _reordered, _final_norm, removable=True, options=_NORMED,
        hf_exports={"full": HFExport("olmo2")},
        no_hf_class={"none": "OLMo 2 always normalizes q and k (model.qk_norm=full), and its one rms_norm_eps serves "
                             "every norm, so its q/k norms cannot be made linear alone",
                     "head": "OLMo 2 normalizes q and k over the full width (model.qk_norm=full), not per head"}),
    "deepnorm": NormScheme(
        _deepnorm, _no_final_norm, options=_GPAS,
        no_hf_class="Post-LN with the residual weighted by (2L)^¼, which no stock class has"),
    "dyt": NormScheme(
        _dyt, _final_dyt, embedding=_embedding_scale, options=_NORMED,
        no_hf_class="tanh in place of the norms and a learnable embedding scalar, which no stock class computes"),
    "derf": NormScheme(
        _derf, _final_derf, embedding=_embedding_scale, options=_NORMED,
        no_hf_class="erf in place of the norms and a learnable embedding scalar, which no stock class computes"),
    "hybridnorm": NormScheme(
        _hybridnorm, _final_norm, init_std=hybridnorm_init_std, options=frozenset({"attn_gate", "norm_gain"}),
        no_hf_class=_NO_VALUE_NORM),
    "hybridnorm_star": NormScheme(
        _hybridnorm_star, _final_norm, init_std=hybridnorm_init_std, options=frozenset({"attn_gate", "norm_gain"}),
        no_hf_class=_NO_VALUE_NORM),
    "ngpt": NormScheme(
        _ngpt, _no_final_norm, logit_scale=_ngpt_logit_scale, init_std=lambda cfg: cfg.d_model ** -0.5,
        unit_weights=NGPT_UNIT_WEIGHTS,
        train_defaults=ngpt_train_defaults,
        no_hf_class="its residual update moves on the unit sphere with learned q/k, MLP and logit scales, which no "
                    "stock class has"),
    "keel": NormScheme(
        _keel, _no_final_norm, options=_NORMED,
        no_hf_class="Post-LN with the shortcut weighted by 2L, which no stock class has"),
    "gemma4": NormScheme(
        _gemma4, _final_norm, embedding=_gemma4_embedding, options=frozenset({"attn_gate", "norm_gain"}),
        hf_exports={"none": HFExport("gemma4_text", "every layer full attention with plain RoPE over the whole head, "
                                                    "no per-layer inputs, no softcap, no MoE, no KV sharing")}),
    "muse_glimmer": NormScheme(
        _muse_glimmer, _muse_final_norm, embedding=_muse_embedding,
        no_hf_class="transformers has no MuseGlimmerForCausalLM: MuseGlimmerForConditionalGeneration carries a vision "
                    "tower and always tanh-softcaps the logits, MuseGlimmerTextModel has no head"),
}
