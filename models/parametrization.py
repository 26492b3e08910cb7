"""One table of multipliers per parameter group: standard, µP (width) and CompleteP (depth and width).

`multipliers(cfg)` is the only place the factors are computed. The model reads its forward multipliers (the branch
multipliers through models/norms.py `block_parts`, the logit multiplier and the attention scale) and the init factors
(models/llama.py `init_weights`); the optimizer (pretrain/config/param_groups.py) reads the learning-rate, weight-decay
and Adam-epsilon factors, for every layout alike (single process, TP, PP, ZeRO through DeepSpeed's param groups,
resume and `init_from`, which all build the model and the optimizer from the config). `pretrain coord-check` checks
the result. torch-free: config validation and `pretrain --help` read it.

With m_d = d_model / base_d_model and m_L = n_layers / base_n_layers (each 1 where its base key is null):

    group        params                          standard   mup (TP V, Adam)          completep (α = 1)
    embedding    tok_emb, emb_out                1          init 1, lr 1, ε / m_d     as mup
    hidden       q/k/v, gate, up, attention gate 1          init / √m_d, lr / m_d,    as mup, wd × m_d,
                                                            ε / m_d                   ε / (m_d m_L)
    branch_out   attention o, MLP down           1          as hidden                 as hidden
    norm         block gains and scalars         1          ε / m_d                   ε / (m_d m_L)
    head         head, final norm, logit scale   1          ε / m_d                   as mup
    forward: logits × 1/m_d and attention scale 1/d_head (mup, completep); each residual branch × 1/m_L (completep).

Sources, quoted:
* µP, Tensor Programs V (Yang et al. 2022), Table 3 (Adam) with the output multiplier of its Table 8 and §F: hidden
  weights "init. var. 1/fan_in, learning rate 1/fan_in" relative to the base, input weights and biases "init var.,
  learning rate constant", output logits "× 1/fan_in" (here 1/m_d, the base model unchanged) and attention logits
  "1/d instead of 1/√d" (q·k / d_head). As EleutherAI's nanoGPT-mup (model.py): `std=init_std /
  sqrt(mup_width_multiplier)` for c_attn, c_fc, c_proj, `lr_scale = 1/mup_width_multiplier` for them,
  `x *= mup_output_alpha / mup_width_multiplier` before the head, `attention_scale = 1.0 / k.size(-1)`, and Adam's
  `eps * (1 / mup_width_multiplier)` for every group.
* CompleteP (Dey et al. 2025, arXiv 2505.01618, Table 1, α = 1; nanoGPT-mup `completep` branch, model.py): residual
  branches `x = x + depth_multiplier**(-depth_alpha_exp) * branch(x)`; hidden weights and norm gains learn at
  `depth_multiplier**(depth_alpha_exp - 1)` (1 for α = 1) on top of µP's width factor; hidden weight decay
  `weight_decay / width_lr_scaling` (× m_d: AdamW's decay lr·λ then stays constant in width); hidden Adam epsilon
  `adam_eps * (1 / mup_width_multiplier) * depth_multiplier**(-depth_alpha_exp)`, the embedding's, head's and final
  norm's `adam_eps * (1 / mup_width_multiplier)`. Its init has no depth factor: the 1/m_L multiplier does the depth.
* ln_free's depth-µP multipliers (model.ln_free_base_depth B; Tensor Programs VI's depth-µP for Adam, emulated with
  fixed multipliers): each branch reads c_in x and adds c_out F, c_in = min(1, √(B/L)), c_out = min(1, B/L), with the
  init of the weights reading c_in x divided by c_in and of the branch outputs by c_out (the model at step 0
  unchanged). They are the same kind of entry: branch multipliers and init factors of this table.

The tunable constants of the µP papers (input and output α, base σ and η) are model.init_std and train.lr of the base
model; `multipliers` is exact at the base shape: standard, mup and completep give the same model there, but for the
attention scale (1/d_head against 1/√d_head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # annotations only: models/config.py imports this module
    from models.config import ModelConfig

PARAMETRIZATIONS = ("standard", "mup", "completep")  # model.parametrization
GROUPS = ("embedding", "hidden", "branch_out", "norm", "head")


@dataclass(frozen=True)
class GroupFactors:
    """Multipliers of one parameter group: of the init std (model.init_std and the scheme's gains), of train.lr,
    train.weight_decay and train.eps."""

    init: float = 1.0
    lr: float = 1.0
    weight_decay: float = 1.0
    eps: float = 1.0


@dataclass(frozen=True)
class Multipliers:
    """The table: a `GroupFactors` per group of `GROUPS`, and the forward multipliers."""

    groups: dict[str, GroupFactors] = field(default_factory=lambda: {g: GroupFactors() for g in GROUPS})
    branch_in: float = 1.0  # on each residual branch's input (ln_free's c_in)
    branch_out: float = 1.0  # on each residual branch's output (ln_free's c_out, CompleteP's 1/m_L)
    logits: float = 1.0  # on the logits (µP's 1/m_d)
    softmax_scale: float | None = None  # of q·k; None: 1/√head_dim
    compensate_init: bool = False  # the branch weights' init divided by the branch multipliers (ln_free's: the
    # model at step 0 unchanged); CompleteP's 1/m_L is not compensated (its init has no depth factor)
    width_ratio: float = 1.0  # m_d
    depth_ratio: float = 1.0  # m_L
    scheme_depth: int | None = None  # the depth a scheme's own depth rules read (ln_free's 1/√(2L) init)


def ln_free_multipliers(cfg: ModelConfig) -> tuple[float, float]:
    """(c_in, c_out) of ln_free: min(1, sqrt(B / L)) and min(1, B / L), B = model.ln_free_base_depth (0: 1, 1)."""
    base, depth = cfg.ln_free_base_depth, cfg.n_layers
    if base == 0:
        return 1.0, 1.0
    return min(1.0, math.sqrt(base / depth)), min(1.0, base / depth)


def ratios(cfg: ModelConfig) -> tuple[float, float]:
    """(m_d, m_L): width and depth over the base model's (1 where the base key is null)."""
    width = cfg.d_model / cfg.base_d_model if cfg.base_d_model else 1.0
    depth = cfg.n_layers / cfg.base_n_layers if cfg.base_n_layers else 1.0
    return width, depth


def multipliers(cfg: ModelConfig) -> Multipliers:
    """The table of `cfg` (see the module docstring for every factor and its source)."""
    c_in, c_out = ln_free_multipliers(cfg) if cfg.norm_scheme == "ln_free" else (1.0, 1.0)
    if cfg.parametrization == "standard":
        return Multipliers(branch_in=c_in, branch_out=c_out, compensate_init=True, scheme_depth=cfg.n_layers)
    m_d, m_L = ratios(cfg)
    completep = cfg.parametrization == "completep"
    hidden_eps = 1.0 / m_d / (m_L if completep else 1.0)
    matrix = GroupFactors(init=1.0 / math.sqrt(m_d), lr=1.0 / m_d, weight_decay=m_d if completep else 1.0,
                          eps=hidden_eps)
    outer = GroupFactors(eps=1.0 / m_d)
    groups = {"embedding": outer, "hidden": matrix, "branch_out": matrix, "norm": GroupFactors(eps=hidden_eps),
              "head": outer}
    width = dict(logits=1.0 / m_d, softmax_scale=1.0 / cfg.head_dim, width_ratio=m_d)
    if not completep:  # µP: width only; ln_free keeps its own depth multipliers
        return Multipliers(groups, branch_in=c_in, branch_out=c_out, compensate_init=True, scheme_depth=cfg.n_layers,
                           **width)
    return Multipliers(groups, branch_out=1.0 / m_L, depth_ratio=m_L, scheme_depth=cfg.base_n_layers or cfg.n_layers,
                       **width)


def param_group(name: str, ndim: int) -> str:
    """The group of `GROUPS` a parameter belongs to, by its name in the model (a `Llama`, a pipeline stage or
    DeepSpeed's PipelineModule, whose names end as the model's)."""
    parts = name.split(".")
    if parts[-2:] == ["tok_emb", "weight"] or "emb_out" in parts:
        return "embedding"
    if parts[-2:] == ["head", "weight"] or "final_norm" in parts or "logit_scale" in parts:
        return "head"
    if parts[-3:] in (["attn", "o", "weight"], ["mlp", "down", "weight"]):
        return "branch_out"
    return "hidden" if ndim >= 2 else "norm"


# (scheme, parametrization) -> why the two do not compose (docs/parametrization.md).
_OWN_DEPTH = "CompleteP's 1/L branch multiplier on top would count depth twice"
REFUSED: dict[tuple[str, str], str] = {
    ("ngpt", "mup"): "nGPT has its own parametrization (unit-norm weights, scales stored at 1/√d)",
    ("ngpt", "completep"): "nGPT has its own parametrization (unit-norm weights, scales stored at 1/√d)",
    ("lns", "completep"): f"LNS's 1/√l on every branch is itself a depth scaling; {_OWN_DEPTH}",
    ("deepnorm", "completep"): f"DeepNorm's α = (2L)^¼ and β = (8L)^-¼ are its depth scaling; {_OWN_DEPTH}",
    ("hybridnorm", "mup"): "its init √(2/(5d)) is already a width rule",
    ("hybridnorm", "completep"): "its init √(2/(5d)) is a width rule and its 1/√(2L) outputs a depth rule",
    ("hybridnorm_star", "mup"): "its init √(2/(5d)) is already a width rule",
    ("hybridnorm_star", "completep"): "its init √(2/(5d)) is a width rule and its 1/√(2L) outputs a depth rule",
    ("post_ln", "completep"): "CompleteP is derived for pre-norm streams; a norm after each add would undo its 1/L",
    ("mix_ln", "completep"): "CompleteP is derived for pre-norm streams; Mix-LN's Post-LN blocks would undo its 1/L",
    ("keel", "completep"): "Keel's α = 2L highway is its depth scaling and its norm after each add would undo CompleteP's "
                           "1/L",
}


def parametrization_refusal(cfg: ModelConfig, schemes) -> str | None:
    """Why `cfg`'s parametrization and scheme (or base keys) do not go together (one line), or None; `schemes`: every
    scheme name (models/norms.py NORM_SCHEMES, which imports this module)."""
    p, scheme = cfg.parametrization, cfg.norm_scheme
    for key in ("base_d_model", "base_n_layers"):
        value = getattr(cfg, key)
        if value is not None and value <= 0:
            return f"model.{key}: must be a positive integer (or null), got {value}"
    if p == "standard":
        for key in ("base_d_model", "base_n_layers"):
            if getattr(cfg, key) is not None:
                return (f"model.{key}={getattr(cfg, key)} is read by model.parametrization=mup or completep only; "
                        f"set it to null or choose a parametrization")
        return None
    if p == "mup" and cfg.base_n_layers is not None:
        return ("model.base_n_layers is read by model.parametrization=completep only (µP scales width); set it to "
                "null or use completep")
    if (scheme, p) in REFUSED:
        return (f"model.parametrization={p} does not compose with model.norm_scheme={scheme} "
                f"({REFUSED[scheme, p]}); {p} composes with {', '.join(s for s in schemes if (s, p) not in REFUSED)}")
    if getattr(cfg, "residual", "single") != "single":
        return (f"model.parametrization={p} with model.residual={cfg.residual}: µP and CompleteP are derived for one "
                "residual stream and give no rule for the streams' mixing weights; use model.parametrization=standard")
    if scheme == "ln_free" and p == "completep" and cfg.ln_free_base_depth:
        return (f"model.parametrization=completep with ln_free: ln_free's own depth multipliers "
                f"(model.ln_free_base_depth={cfg.ln_free_base_depth}) would count depth twice; set "
                "model.ln_free_base_depth=0 so that CompleteP's 1/L is the one depth scaling")
    return None


def table_rows(cfg: ModelConfig) -> list[tuple[str, GroupFactors]]:
    """(group, factors) in `GROUPS` order (coord_check.json carries them)."""
    table = multipliers(cfg)
    return [(g, table.groups[g]) for g in GROUPS]
