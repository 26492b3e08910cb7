"""Normalization layers and the one table that says where each scheme puts them.

A block (models/llama.py) always computes

    h   = attn_post_norm(alpha * x + attn_out_norm(Attn(attn_norm(x))))
    out = mlp_post_norm (alpha * h + mlp_out_norm (MLP (mlp_norm (h))))

and a scheme is nothing but the choice of those six parts (nn.Identity where a scheme has no norm), the
residual weight alpha and a few init gains, per layer l = 1..L. Adding a scheme means adding one entry
to `NORM_SCHEMES`, never an `if` in the forward pass.

    pre_ln    x = x + F(N(x))                                   final N
    lns       x = x + F(N(x) / sqrt(l))   (LayerNorm Scaling)   final N, unscaled
    ln_free   x = x + c_out F(c_in x), fixed depth-muP multipliers    no final norm; depth-scaled output init
    post_ln   x = N(x + F(x))                                   no final norm (last block ends in N)
    mix_ln    post_ln in blocks l <= floor(0.25 L), pre_ln after final N
    peri_ln   x = x + N_out(F(N_in(x)))                         final N
    reordered x = x + N(F(x))   (OLMo 2)                        final N
    deepnorm  x = N(alpha x + F(x)), alpha = (2L)^(1/4),        no final norm
              init gain beta = (8L)^(-1/4) on value, attention-output, MLP up and down weights
    dyt       N replaced by DyT(x) = gamma * tanh(alpha x) (+ b)  final DyT

Norm removal (`pretrain remove-norms`, pretrain/removal/): with `model.removable_norms` the norms of a
`removable` scheme (pre_ln, lns) are `RemovableRMSNorm` / `RemovableLayerNorm` sites, each of which can switch
from its live statistic to a fixed scale sigma; `REMOVAL_SITES` names the sites, the order groups of the
schedule and the weights each site feeds, into which a fixed site folds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.parallel import HeadNorm, TensorParallel, WidthNorm

if TYPE_CHECKING:
    from models.config import ModelConfig  # annotations only: models/config.py imports this module's tables


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as Llama does), times a learnable gain and a fixed `output_scale`."""

    def __init__(self, dim: int, eps: float = 1e-6, output_scale: float = 1.0):
        super().__init__()
        self.dim, self.eps, self.output_scale = dim, eps, output_scale
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(_at_least_fp32(x), (self.dim,), eps=self.eps).type_as(x) * self.weight
        return y * self.output_scale if self.output_scale != 1.0 else y

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, output_scale={self.output_scale:.4g}"


class LayerNorm(RMSNorm):
    """Bias-free LayerNorm (the project uses no biases), fp32 statistics, fixed `output_scale`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(_at_least_fp32(x), (self.dim,), eps=self.eps).type_as(x) * self.weight
        return y * self.output_scale if self.output_scale != 1.0 else y


class _Removable:
    """A norm site that norm removal (pretrain/removal/) can switch to a fixed scale.

    Live (the default): the norm's own formula. While `tracking` (set by the removal hooks) and in training mode
    it also records the statistic the norm divides by, RMS(x) (LayerNorm: the standard deviation), averaged over
    every token but those at position 0 (see README "Removing norms": the first position's residual is several
    times larger and would set sigma for the rare case). Fixed: x / sigma * weight * output_scale (LayerNorm:
    (x - mean(x)) / sigma ...), one scalar sigma for every token -- a per-channel constant scale the fold
    multiplies into the next linear layer. `sigma` (0 = never measured) and `fixed` are persistent buffers, so
    checkpoints hold them; sigma stays float32 when the model is cast to bf16 (it is a statistic, like the
    norm's own, which is computed in float32).
    """

    centred = False

    def _init_removable(self) -> None:
        self.register_buffer("sigma", torch.zeros(1))
        self.register_buffer("fixed", torch.zeros(1, dtype=torch.bool))
        self.is_fixed = False  # mirrors `fixed` without a device sync per forward
        self.tracking = False
        self._stat: torch.Tensor | None = None  # (sum, count) of the statistic since the last take_statistic()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_fixed:
            x32 = _at_least_fp32(x)
            if self.centred:
                x32 = x32 - x32.mean(-1, keepdim=True)
            y = (x32 / self.sigma.to(x32.dtype)).type_as(x) * self.weight
            return y * self.output_scale if self.output_scale != 1.0 else y
        if self.tracking and self.training:
            self._record(x)
        return super().forward(x)

    def statistic(self, x: torch.Tensor) -> torch.Tensor:
        """What the live norm divides each token by: sqrt(mean(x^2) + eps), or sqrt(var(x) + eps) (LayerNorm)."""
        x32 = _at_least_fp32(x)
        if self.centred:
            x32 = x32 - x32.mean(-1, keepdim=True)
        return x32.pow(2).mean(-1).add(self.eps).sqrt()

    @torch.no_grad()
    def _record(self, x: torch.Tensor) -> None:
        if x.dim() >= 2 and x.shape[-2] > 1:
            x = x[..., 1:, :]  # [B, T, D]: position 0 left out
        s = self.statistic(x.detach()).double()
        total = torch.stack([s.sum(), torch.tensor(float(s.numel()), dtype=torch.float64, device=s.device)])
        self._stat = total if self._stat is None else self._stat + total

    def take_statistic(self) -> torch.Tensor:
        """(sum, count) recorded since the last call, float64 on the module's device; zeros when nothing was."""
        stat = self._stat if self._stat is not None else torch.zeros(2, dtype=torch.float64, device=self.sigma.device)
        self._stat = None
        return stat

    @torch.no_grad()
    def set_fixed(self, fixed: bool) -> None:
        if fixed and not self.sigma.item() > 0:
            raise ValueError("a norm site cannot be fixed before its sigma was measured (sigma = 0)")
        self.fixed.fill_(fixed)
        self.is_fixed = bool(fixed)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if not self.fixed.is_meta:
            self.is_fixed = bool(self.fixed.item())

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.sigma.dtype != torch.float32 and not self.sigma.is_meta:
            self.sigma = self.sigma.float()
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, removable"


class RemovableRMSNorm(_Removable, RMSNorm):
    def __init__(self, dim: int, eps: float = 1e-6, output_scale: float = 1.0):
        super().__init__(dim, eps, output_scale)
        self._init_removable()


class RemovableLayerNorm(_Removable, LayerNorm):
    centred = True

    def __init__(self, dim: int, eps: float = 1e-6, output_scale: float = 1.0):
        super().__init__(dim, eps, output_scale)
        self._init_removable()


class DyT(nn.Module):
    """Dynamic Tanh (Zhu et al., 2025): gamma * tanh(alpha * x) (+ beta with `bias`), a learnable scalar alpha."""

    def __init__(self, dim: int, alpha_init: float = 0.5, bias: bool = False):
        super().__init__()
        self.dim, self.alpha_init = dim, alpha_init
        self.alpha = nn.Parameter(torch.full((1,), alpha_init))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.weight * torch.tanh(self.alpha * x)
        return y if self.bias is None else y + self.bias

    def reset_parameters(self) -> None:
        nn.init.constant_(self.alpha, self.alpha_init)
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{self.dim}, alpha_init={self.alpha_init}, bias={self.bias is not None}"


# The DyT paper's LLaMA settings (its Table of alpha0 per model; repository other_tasks/LLaMA): width of the
# model -> (alpha0 of the attention-input DyT, alpha0 of the MLP-input and final DyT). Widths up to 4096 (the
# 7B model, the smallest the paper tunes) take the 7B values, up to 5120 the 13B ones, wider ones the 34B/70B ones.
DYT_LLAMA_ALPHA0 = ((4096, 0.8, 0.2), (5120, 0.6, 0.15), (math.inf, 0.2, 0.05))


def dyt_alpha_inits(cfg: ModelConfig) -> tuple[float, float]:
    """(attention-input alpha0, other alpha0): the config's values where given, else the paper's width rule."""
    attn, other = next((a, o) for width, a, o in DYT_LLAMA_ALPHA0 if cfg.d_model <= width)
    return (cfg.dyt_alpha_init_attn if cfg.dyt_alpha_init_attn is not None else attn,
            cfg.dyt_alpha_init if cfg.dyt_alpha_init is not None else other)


class Scale(nn.Module):
    """A fixed multiplier: no parameter, no statistic (ln_free's depth-muP multipliers)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def extra_repr(self) -> str:
        return f"{self.scale:.4g}"


# The block's slots, a declared interface: `BlockParts` fills them, models/llama.py `Block` holds them under these
# attribute names (state-dict prefixes too), and diagnostics, depth analyses, attribution, HF conversion and norm
# removal read a block through them.
ATTN_IN, ATTN_OUT, ATTN_POST = "attn_norm", "attn_out_norm", "attn_post_norm"
MLP_IN, MLP_OUT, MLP_POST = "mlp_norm", "mlp_out_norm", "mlp_post_norm"
SLOTS = (ATTN_IN, ATTN_OUT, ATTN_POST, MLP_IN, MLP_OUT, MLP_POST)

NORM_CLASSES = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}
REMOVABLE_NORM_CLASSES = {"rmsnorm": RemovableRMSNorm, "layernorm": RemovableLayerNorm}
NormFactory = Callable[[], nn.Module]


@dataclass(frozen=True)
class BlockParts:
    """The swappable parts of one block, one factory per slot of `SLOTS` (see the module docstring for where each
    one sits)."""

    attn_norm: NormFactory = nn.Identity
    attn_out_norm: NormFactory = nn.Identity
    attn_post_norm: NormFactory = nn.Identity
    mlp_norm: NormFactory = nn.Identity
    mlp_out_norm: NormFactory = nn.Identity
    mlp_post_norm: NormFactory = nn.Identity
    residual_alpha: float = 1.0
    # Multipliers of model.init_std for the block's weights.
    init_gain_qkv: float = 1.0  # all of q, k, v (v also gets init_gain_value)
    init_gain_value: float = 1.0
    init_gain_attn_out: float = 1.0
    init_gain_gate: float = 1.0
    init_gain_up: float = 1.0
    init_gain_mlp_out: float = 1.0


@dataclass(frozen=True)
class NormScheme:
    block: Callable[[ModelConfig, int], BlockParts]  # (config, l in 1..L) -> parts of block l
    final_norm: Callable[[ModelConfig], nn.Module]
    llama_compatible: bool  # exportable to transformers' LlamaForCausalLM (norm scales folded into weights)
    removable: bool = False  # `pretrain remove-norms` can fine-tune its norms away (its sites: REMOVAL_SITES)
    norm_free: bool = False  # no norm anywhere: the residual stream is the sum of embedding and branch outputs
    unit_embedding: bool = False  # an untied token embedding starts at variance 1 instead of model.init_std^2


def embedding_init_gain(cfg: ModelConfig) -> float:
    """Multiplier of model.init_std for the token embedding (see `unit_embedding`)."""
    unit = NORM_SCHEMES[cfg.norm_scheme].unit_embedding and not cfg.tie_embeddings
    return 1.0 / cfg.init_std if unit else 1.0


# Norm removal: schedule group -> (the norm module's name in a block, or at the top for the final norm; the weights
# that read its output, whose input columns the fold multiplies by the fixed site's per-channel scale).
REMOVAL_SITES: dict[str, tuple[str, tuple[str, ...]]] = {
    "mlp": (MLP_IN, ("mlp.gate.weight", "mlp.up.weight")),
    "attn": (ATTN_IN, ("attn.qkv.weight",)),
    "final": ("final_norm", ("head.weight",)),
}


def norm(cfg: ModelConfig, scale: float = 1.0) -> NormFactory:
    cls = (REMOVABLE_NORM_CLASSES if cfg.removable_norms else NORM_CLASSES)[cfg.norm_type]
    return lambda: cls(cfg.d_model, cfg.norm_eps, output_scale=scale)


def dyt(cfg: ModelConfig, alpha_init: float) -> NormFactory:
    return lambda: DyT(cfg.d_model, alpha_init, bias=cfg.dyt_bias)


def _pre_ln(cfg: ModelConfig, layer: int) -> BlockParts:
    return BlockParts(attn_norm=norm(cfg), mlp_norm=norm(cfg))


def _lns(cfg: ModelConfig, layer: int) -> BlockParts:
    # LayerNorm Scaling (Sun et al., 2025): both norm outputs of block l are multiplied by 1/sqrt(l).
    scaled = norm(cfg, scale=1.0 / math.sqrt(layer))
    return BlockParts(attn_norm=scaled, mlp_norm=scaled)


def ln_free_multipliers(cfg: ModelConfig) -> tuple[float, float]:
    """(c_in, c_out) of ln_free: min(1, sqrt(B / L)) and min(1, B / L), B = model.ln_free_base_depth (0: 1, 1)."""
    base, depth = cfg.ln_free_base_depth, cfg.n_layers
    if base == 0:
        return 1.0, 1.0
    return min(1.0, math.sqrt(base / depth)), min(1.0, base / depth)


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
    # unchanged; under Adam a fixed multiplier c on a weight is that weight's learning rate times c.
    c_in, c_out = ln_free_multipliers(cfg)
    gain = 1.0 / math.sqrt(2 * cfg.n_layers)
    if c_in == c_out == 1.0:
        return BlockParts(init_gain_attn_out=gain, init_gain_mlp_out=gain)
    return BlockParts(
        attn_norm=lambda: Scale(c_in), mlp_norm=lambda: Scale(c_in),
        attn_out_norm=lambda: Scale(c_out), mlp_out_norm=lambda: Scale(c_out),
        init_gain_qkv=1.0 / c_in, init_gain_gate=1.0 / c_in, init_gain_up=1.0 / c_in,
        init_gain_attn_out=gain / c_out, init_gain_mlp_out=gain / c_out,
    )


def _post_ln(cfg: ModelConfig, layer: int) -> BlockParts:
    return BlockParts(attn_post_norm=norm(cfg), mlp_post_norm=norm(cfg))


def _mix_ln(cfg: ModelConfig, layer: int) -> BlockParts:
    n_post = math.floor(cfg.mix_ln_post_fraction * cfg.n_layers)
    return _post_ln(cfg, layer) if layer <= n_post else _pre_ln(cfg, layer)


def _peri_ln(cfg: ModelConfig, layer: int) -> BlockParts:
    return BlockParts(attn_norm=norm(cfg), attn_out_norm=norm(cfg), mlp_norm=norm(cfg), mlp_out_norm=norm(cfg))


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
        residual_alpha=(2 * cfg.n_layers) ** 0.25,
        init_gain_value=beta,
        init_gain_attn_out=beta,
        init_gain_up=beta,
        init_gain_mlp_out=beta,
    )


def _dyt(cfg: ModelConfig, layer: int) -> BlockParts:
    # The DyT paper's LLaMA: its own alpha0 for the DyT before attention, another for the others (before the MLP,
    # and the final one).
    attn, other = dyt_alpha_inits(cfg)
    return BlockParts(attn_norm=dyt(cfg, attn), mlp_norm=dyt(cfg, other))


def _final_dyt(cfg: ModelConfig) -> nn.Module:
    return dyt(cfg, dyt_alpha_inits(cfg)[1])()


def _final_norm(cfg: ModelConfig) -> nn.Module:
    return norm(cfg)()


def _no_final_norm(cfg: ModelConfig) -> nn.Module:
    return nn.Identity()


def _no_qk_norm(cfg: ModelConfig, tp: TensorParallel | None) -> tuple[nn.Module, nn.Module]:
    return nn.Identity(), nn.Identity()


def _head_qk_norm(cfg: ModelConfig, tp: TensorParallel | None) -> tuple[nn.Module, nn.Module]:
    # Qwen3 / Gemma 3: one norm over head_dim, its gain shared by every head (replicated under TP).
    centred = cfg.norm_type == "layernorm"
    return HeadNorm(cfg.head_dim, cfg.norm_eps, centred, tp), HeadNorm(cfg.head_dim, cfg.norm_eps, centred, tp)


def _full_qk_norm(cfg: ModelConfig, tp: TensorParallel | None) -> tuple[nn.Module, nn.Module]:
    # OLMo 2: one norm over the whole projected width, n_heads * head_dim for q and n_kv_heads * head_dim for k.
    centred = cfg.norm_type == "layernorm"
    return (WidthNorm(cfg.n_heads * cfg.head_dim, cfg.norm_eps, centred, tp),
            WidthNorm(cfg.n_kv_heads * cfg.head_dim, cfg.norm_eps, centred, tp))


# model.qk_norm -> (q norm, k norm) of every block's attention, applied to q [B, T, H, E] and k [B, T, K, E] before
# RoPE: the attention's q_norm / k_norm slots. Composable with every scheme that has norms (not ln_free).
QK_NORMS: dict[str, Callable[[ModelConfig, TensorParallel | None], tuple[nn.Module, nn.Module]]] = {
    "none": _no_qk_norm,
    "head": _head_qk_norm,
    "full": _full_qk_norm,
}


NORM_SCHEMES: dict[str, NormScheme] = {
    "pre_ln": NormScheme(_pre_ln, _final_norm, llama_compatible=True, removable=True),
    "lns": NormScheme(_lns, _final_norm, llama_compatible=True, removable=True),
    "ln_free": NormScheme(_ln_free, _no_final_norm, llama_compatible=False, norm_free=True, unit_embedding=True),
    "post_ln": NormScheme(_post_ln, _no_final_norm, llama_compatible=False),
    "mix_ln": NormScheme(_mix_ln, _final_norm, llama_compatible=False),
    "peri_ln": NormScheme(_peri_ln, _final_norm, llama_compatible=False),
    "reordered": NormScheme(_reordered, _final_norm, llama_compatible=False),
    "deepnorm": NormScheme(_deepnorm, _no_final_norm, llama_compatible=False),
    "dyt": NormScheme(_dyt, _final_dyt, llama_compatible=False),
}
