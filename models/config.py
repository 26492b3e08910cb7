"""Model configuration: one dataclass, a few named presets.

Every field carries its documentation in `metadata["help"]`; the config reference of docs/configuration.md
and `pretrain config --docs` are generated from it, so it is written once.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Literal

from models.norms import (ATTN_GATES, NORM_GAINS, NORM_SCHEMES, NORM_TYPES, QK_NORMS, RESIDUALS,
                          option_refusal, residual_streams)
from models.parametrization import PARAMETRIZATIONS, parametrization_refusal


def doc(default, help: str, choices: dict | None = None, **kwargs):
    """A dataclass field with its one-line documentation (and, where the valid values live in a table, them)."""
    # A table's valid values are its keys when a value is checked (an entry added after this import counts too).
    metadata = {"help": help} if choices is None else {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class ModelConfig:
    preset: str | None = doc(
        None,
        "Named base shape (tiny, 130m, 250m, 350m, 1b, 1b-aligned); keys given next to it override the preset's "
        "values.",
    )
    vocab_size: int = doc(2048, "Vocabulary size; must be >= the tokenizer's and divisible by parallel.tp.")
    d_model: int = doc(128, "Hidden size.")
    n_layers: int = doc(8, "Number of transformer blocks (L).")
    n_heads: int = doc(4, "Attention (query) heads; must divide d_model and be divisible by parallel.tp.")
    n_kv_heads: int | None = doc(
        None, "Key/value heads for grouped-query attention (null = n_heads); must divide n_heads."
    )
    ffn_hidden: int = doc(384, "SwiGLU inner size.")
    max_seq_len: int = doc(1024, "Longest sequence the RoPE cache is built for; must be >= data.seq_len.")
    rope_theta: float = doc(10000.0, "RoPE base frequency.")
    norm_scheme: str = doc(
        "pre_ln", f"Where the norms go: {', '.join(NORM_SCHEMES)} (the table in models/norms.py, with the formulas).",
        choices=NORM_SCHEMES,
    )
    norm_type: str = doc(
        "rmsnorm", f"Norm used by the scheme: {' or '.join(NORM_TYPES)} (bias-free). Unused by ln_free and dyt.",
        choices=NORM_TYPES,
    )
    norm_eps: float = doc(1e-6, "Epsilon of RMSNorm/LayerNorm.")
    qk_norm: str = doc(
        "none",
        "QK-norm (see docs/schemes.md for the schemes that take it): the run's norm_type on q and k before RoPE; "
        "head: per head over head_dim, one gain shared by the heads (Qwen3, Gemma 3); full: over the full projected "
        "width, n_heads*head_dim for q and n_kv_heads*head_dim for k (OLMo 2), exact under tensor parallelism.",
        choices=QK_NORMS,
    )
    attn_gate: str = doc(
        "none",
        "Gated attention (Qiu et al., 2025; Qwen3-Next): each head's attention output times sigmoid(X W_g) before the "
        "output projection, X the attention's input; headwise: one gate per head; elementwise: one per head and "
        "channel. W_g is split with the heads under tensor parallelism.",
        choices=ATTN_GATES,
    )
    gpas: bool = doc(
        False,
        "GPAS (Chen et al., 2025): after each residual add x <- x - SiLU(g) * stopgrad(x), one scalar g per block "
        "from 0 (deepnorm and mix_ln's Post-LN blocks scale the shortcut before the add); pre_ln, lns, mix_ln, "
        "peri_ln, deepnorm.",
    )
    norm_gain: str = doc(
        "one",
        "Norm gains: one: output * w, w from 1; zero_centered: output * (1 + w), w from 0 (Megatron "
        "layernorm_zero_centered_gamma, Gemma, Qwen3-Next), so weight decay (train.decay_norms_and_embeddings) pulls "
        "the gain toward 1. Every fold (HF export, remove-norms) uses the gain 1 + w.",
        choices=NORM_GAINS,
    )
    residual: str = doc(
        "single",
        "The residual as a state of streams (models/streams.py; pre_ln): single: the scheme's one stream; mhc: "
        "DeepSeek-V4's manifold-constrained hyper-connections (n streams mixed by a Sinkhorn-Knopp doubly-stochastic "
        "matrix, the embedding copied into them, a learned collapse before the final norm; transformers "
        "DeepseekV4HyperConnection); hc: hyper-connections (Zhu et al., ICLR 2025), dynamic; hc_static: their "
        "static form (streams summed before the final norm); attn_res: Block Attention Residuals (Kimi, arXiv "
        "2603.15031: each sublayer's input a softmax mix over depth of the embedding and the earlier blocks' sums, "
        "from a learned pseudo-query); siamese: SiameseNorm (arXiv 2602.08064: a Post-Norm-like and a Pre-Norm-like "
        "stream sharing every sublayer's update).",
        choices=RESIDUALS,
    )
    residual_streams: int | None = doc(
        None, "mhc, hc and hc_static: the number of residual streams n (null: 4, DeepSeek-V4's hc_mult); attn_res: "
              "the number of blocks N the layers are grouped into, a divisor of model.n_layers (null: 8, the paper's, "
              "or n_layers where fewer)."
    )
    residual_sinkhorn_iters: int | None = doc(
        None, "mhc only: Sinkhorn-Knopp iterations of the streams' mixing matrix (null: 20, DeepSeek-V4's)."
    )
    qk_norm_scale: Literal["learned", "none"] | None = doc(
        None,
        "What the per-head q/k norms (model.qk_norm=head) carry: null: a learned gain, attention scale 1/sqrt(head_dim) "
        "(Qwen3); learned: a learned gain with attention scale 1 (Gemma 4); none: no gain, q times the constant 3.87 "
        "at attention scale 1/sqrt(head_dim) (Muse Glimmer's qk_scale_factor). Exact under tensor parallelism.",
    )
    v_norm: bool = doc(
        False,
        "An RMSNorm without gain on v, per head over head_dim, before attention (Gemma 4's v_norm); exact under tensor "
        "parallelism (each rank normalizes its own heads).",
    )
    layer_scalar: bool = doc(
        False,
        "A learnable scalar (from 1) times each block's output, the whole residual stream after its last add (Gemma "
        "4's layer_scalar); replicated under tensor parallelism.",
    )
    mix_ln_post_fraction: float = doc(
        0.25, "mix_ln only: the first floor(fraction * n_layers) blocks are Post-LN, the rest Pre-LN."
    )
    ln_free_base_depth: int = doc(
        4,
        "ln_free only: depth-muP multipliers calibrated at this depth B: each branch reads min(1, sqrt(B/L)) * x and "
        "adds min(1, B/L) * F (init compensated; = per-weight learning rates under Adam); 0 = no multipliers, "
        "x + F(x) with the unit-variance embedding alone (lower loss at lr <= 2e-3 on tiny, less margin above: "
        "docs/schemes.md).",
    )
    dyt_alpha_init: float | None = doc(
        None,
        "dyt and derf only: initial alpha in gamma*tanh(alpha*x) (derf: gamma*erf(alpha*x + s) + beta) of the "
        "MLP-input and final site (null: the DyT paper's LLaMA value for the width: 0.2 up to d_model 4096, 0.15 up "
        "to 5120, 0.05 above).",
    )
    dyt_alpha_init_attn: float | None = doc(
        None,
        "dyt and derf only: initial alpha of the attention-input site (null: 0.8 up to d_model 4096, 0.6 up to 5120, "
        "0.2 above).",
    )
    dyt_bias: bool = doc(
        False, "dyt only: DyT with a learnable bias, gamma*tanh(alpha*x) + beta (the LLaMA setting has none)."
    )
    tie_embeddings: bool = doc(False, "Share the input embedding matrix with the output head.")
    init_std: float | None = doc(
        None,
        "Std of the normal init of every linear and embedding weight (before scheme gains); null: 0.02, or the "
        "scheme paper's own (hybridnorm, hybridnorm_star: sqrt(2/(5 d_model)); ngpt: 1/sqrt(d_model)).",
    )
    parametrization: str = doc(
        "standard",
        "How init, per-group learning rates, weight decay, Adam epsilon and forward multipliers scale with the model's "
        "shape (models/parametrization.py, the one table): standard (as given); mup (µP, Tensor Programs V: hidden "
        "weights init / sqrt(m_d), lr / m_d, logits x 1/m_d, attention scale 1/head_dim); completep (CompleteP, Dey et "
        "al. 2025, alpha = 1: mup plus each residual branch x 1/m_L, hidden weight decay x m_d). m_d = d_model / "
        "base_d_model, m_L = n_layers / base_n_layers. The schemes each composes with: docs/parametrization.md.",
        choices=PARAMETRIZATIONS,
    )
    base_d_model: int | None = doc(
        None, "mup and completep: the width the hyper-parameters were tuned at (null = d_model, m_d = 1)."
    )
    base_n_layers: int | None = doc(
        None, "completep only: the depth the hyper-parameters were tuned at (null = n_layers, m_L = 1)."
    )
    removable_norms: bool = doc(
        False,
        "pre_ln/lns/reordered only: every norm (q/k norms included) also holds a fixed scale sigma it can switch "
        "to (norm removal by fine-tuning; set by `pretrain remove-norms`, see docs/removal.md).",
    )
    taper_norms: bool = doc(
        False,
        "With model.removable_norms, pre_ln/lns without q/k norms: every norm is a TaperNorm (arXiv 2602.10408), "
        "g * Norm(x) + (1 - g) * c * x * gain~, its gate g taken from 1 to 0 by removal.start and "
        "removal.taper_steps, then folded into an ln_free model (`pretrain remove-norms --method taper`, or "
        "`pretrain train` from scratch; docs/removal.md).",
    )

    def __post_init__(self) -> None:
        check_choices(self, prefix="model.")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}: must be a positive integer, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model: {self.d_model} is not divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_kv_heads: {self.n_kv_heads} must divide model.n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"model.d_model/n_heads: head dim {self.d_model // self.n_heads} must be even for RoPE")
        if self.ln_free_base_depth < 0:
            raise ValueError(
                f"model.ln_free_base_depth: must be >= 0 (0 = no multipliers), got {self.ln_free_base_depth}"
            )
        if not 0.0 <= self.mix_ln_post_fraction <= 1.0:
            raise ValueError(f"model.mix_ln_post_fraction: must be in [0, 1], got {self.mix_ln_post_fraction}")
        for name in ("init_std", "norm_eps", "rope_theta", "dyt_alpha_init", "dyt_alpha_init_attn"):
            value = getattr(self, name)
            if value is None and name in ("init_std", "dyt_alpha_init", "dyt_alpha_init_attn"):
                continue
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"model.{name}: must be a positive finite number, got {value}")
        refusal = option_refusal(self) or parametrization_refusal(self, NORM_SCHEMES)
        if refusal:
            raise ValueError(refusal)
        for name, takers in (("residual_streams", ("mhc", "hc", "hc_static", "attn_res")),
                             ("residual_sinkhorn_iters", ("mhc",))):
            value = getattr(self, name)
            if value is None:
                continue
            if self.residual not in takers:
                raise ValueError(f"model.{name}: set for model.residual={self.residual}, which has no such setting; "
                                 f"it is for model.residual={' or '.join(takers)}")
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name}: must be a positive integer, got {value}")
        if self.residual == "attn_res" and self.n_layers % residual_streams(self):
            raise ValueError(f"model.residual_streams={residual_streams(self)}: attn_res groups the "
                             f"model.n_layers={self.n_layers} layers into blocks of equal size; set it to a divisor "
                             f"of {self.n_layers}")
        if self.qk_norm_scale is not None and self.qk_norm != "head":
            raise ValueError(f"model.qk_norm_scale={self.qk_norm_scale}: it sets what the per-head q/k norms carry, and "
                             f"model.qk_norm={self.qk_norm} has none; set model.qk_norm=head")
        if NORM_SCHEMES[self.norm_scheme].unit_weights and self.tie_embeddings:
            raise ValueError(f"model.tie_embeddings: {self.norm_scheme} keeps separate unit-norm input and output "
                             "embeddings (the paper's); set model.tie_embeddings=false")
        if self.removable_norms:
            # q/k norms are removal sites (models/norms.py REMOVAL_SITES); these two have no fixed-scale form yet
            for key, what in (("attn_gate", "the attention gate (it reads the attention's normalized input)"),
                              ("gpas", "GPAS (the folded ln_free model has no scaling)"),
                              ("residual", "residual streams (the folded ln_free model has one stream)"),
                              ("qk_norm_scale", "q/k norms with attention scale 1 or without gain"),
                              ("v_norm", "the v norm"), ("layer_scalar", "the layer scalar")):
                if getattr(self, key) != type(self).__dataclass_fields__[key].default:
                    raise ValueError(f"model.removable_norms: norm removal does not cover {what} "
                                     f"(model.{key}={getattr(self, key)}) yet; leave model.{key} at its default")
            removable = [name for name, scheme in NORM_SCHEMES.items() if scheme.removable]
            if not NORM_SCHEMES[self.norm_scheme].removable:
                raise ValueError(
                    f"model.removable_norms: norm removal works on {', '.join(removable[:-1])} and {removable[-1]} "
                    f"models, not {self.norm_scheme}; set model.removable_norms=false"
                )
        if self.taper_norms:
            if not self.removable_norms:
                raise ValueError("model.taper_norms: TaperNorm sites are norm-removal sites; set "
                                 "model.removable_norms=true too")
            taper = [name for name, scheme in NORM_SCHEMES.items() if scheme.taperable]
            if not NORM_SCHEMES[self.norm_scheme].taperable or self.qk_norm != "none":
                raise ValueError(f"model.taper_norms: the taper covers the input and final norms of "
                                 f"{' and '.join(taper)} models without q/k norms, not {self.norm_scheme} with "
                                 f"model.qk_norm={self.qk_norm}; use remove-norms' default method (--method fixed)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def weight_std(self) -> float:
        """The std weights are drawn with: model.init_std, or where it is null the scheme paper's (0.02 otherwise).
        Resolved here rather than stored, so that a config whose scheme is replaced gets the new scheme's."""
        if self.init_std is not None:
            return self.init_std
        paper_std = NORM_SCHEMES[self.norm_scheme].init_std
        return 0.02 if paper_std is None else paper_std(self)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"model.preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], "preset": name, **overrides})


# Shapes of the Curse of Depth paper (vocab 32000, RMSNorm eps 1e-6), plus a CPU-sized `tiny`.
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=2048, d_model=128, n_layers=8, n_heads=4, n_kv_heads=2, ffn_hidden=384, max_seq_len=1024),
    "130m": dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_hidden=2048),
    "250m": dict(vocab_size=32000, d_model=768, n_layers=24, n_heads=16, n_kv_heads=16, ffn_hidden=2560),
    "350m": dict(vocab_size=32000, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16, ffn_hidden=2736),
    "1b": dict(vocab_size=32000, d_model=2048, n_layers=24, n_heads=32, n_kv_heads=32, ffn_hidden=5461),
    # The paper's 1b has ffn 5461 (8/3 * 2048, odd): GEMMs with a dimension that is no multiple of 64 run off the
    # X
    "1b-aligned": dict(vocab_size=32000, d_model=2048, n_layers=24, n_heads=32, n_kv_heads=32, ffn_hidden=5504),
}


def check_choices(obj, prefix: str = "") -> None:
    """Raise a one-line ValueError for any field whose value is not one of its choices (its `Literal[...]` type,
    or the table its `choices` metadata names)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices") or literal_choices(hints[f.name])
        value = getattr(obj, f.name)
        if choices and value not in choices:
            raise ValueError(f"{prefix}{f.name}: {value!r} is not one of {', '.join(map(str, choices))}")


def literal_choices(tp) -> tuple | None:
    """The allowed values of a `Literal[...]` (or `Literal[...] | None`) annotation, else None."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    for arg in typing.get_args(tp):
        if typing.get_origin(arg) is Literal:
            return typing.get_args(arg) + ((None,) if type(None) in typing.get_args(tp) else ())
    return None
