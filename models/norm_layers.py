"""The torch modules the scheme table of models/norms.py builds: the normalization layers (RMSNorm and LayerNorm in
fp32, their removable forms for norm removal (pretrain/removal/), DyT and Derf, the embedding's learnable scalar, a
fixed multiplier) and, re-exported, the block parts of models/parts.py, models/streams.py and models/parallel.py a
scheme uses. Kept
apart from the table so that reading it (config validation, `pretrain --help`) does not import torch;
models/norms.py `layers()` imports this module when a model is built."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import Identity

from models.parallel import HeadNorm, SplitScale, TensorParallel, WidthNorm
from models.parts import GPAS, AttentionGate, L2Norm, NGPTResidual, Residual, Ungated, UnitScaled
from models.streams import (AttnResExpand, AttnResHead, AttnResResidual, HCResidual, MHCHead, MHCResidual,
                            SiameseHead, SiameseResidual, StreamExpand, StreamSum)

__all__ = ["Identity", "RMSNorm", "LayerNorm", "RemovableNorm", "RemovableRMSNorm", "RemovableLayerNorm",
           "TaperNorm", "TaperRMSNorm", "TaperLayerNorm", "TAPER_NORM_CLASSES", "TAPER_GAIN", "ScaleAnchor",
           "RemovableHeadNorm", "RemovableWidthNorm", "DyT", "Derf", "EmbeddingScale", "Scale", "ScalelessRMSNorm",
           "LayerScalar", "NORM_CLASSES",
           "REMOVABLE_NORM_CLASSES", "HeadNorm", "WidthNorm", "SplitScale", "GPAS", "AttentionGate", "L2Norm",
           "NGPTResidual", "Residual", "Ungated", "UnitScaled", "HCResidual", "MHCHead", "MHCResidual", "StreamExpand",
           "StreamSum", "AttnResExpand", "AttnResHead", "AttnResResidual", "SiameseHead", "SiameseResidual"]


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as Llama does), times a learnable gain and a fixed `output_scale`.

    The gain is `weight + gain_offset` (model.norm_gain, `NORM_GAINS`): offset 0 with `weight` from 1, or the
    zero-centred offset 1 with `weight` from 0 -- the same function at init, but weight decay on `weight` then pulls
    the gain toward 1 instead of 0. Folds (HF export, norm removal) read `gain()`, never `weight`."""

    def __init__(self, dim: int, eps: float = 1e-6, output_scale: float = 1.0, gain_offset: float = 0.0):
        super().__init__()
        self.dim, self.eps, self.output_scale, self.gain_offset = dim, eps, output_scale, gain_offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - gain_offset))

    def gain(self) -> torch.Tensor:
        return self.weight + self.gain_offset if self.gain_offset else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(_at_least_fp32(x), (self.dim,), eps=self.eps).type_as(x) * self.gain()
        return y * self.output_scale if self.output_scale != 1.0 else y

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, 1.0 - self.gain_offset)

    def extra_repr(self) -> str:
        offset = f", gain=1+w" if self.gain_offset else ""
        return f"{self.dim}, eps={self.eps}, output_scale={self.output_scale:.4g}{offset}"


class LayerNorm(RMSNorm):
    """Bias-free LayerNorm (the project uses no biases), fp32 statistics, fixed `output_scale`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(_at_least_fp32(x), (self.dim,), eps=self.eps).type_as(x) * self.gain()
        return y * self.output_scale if self.output_scale != 1.0 else y


class RemovableNorm:
    """A norm site that norm removal (pretrain/removal/) can switch to a fixed scale.

    Live (the default): the norm's own formula. While `tracking` (set by the removal hooks) and in training mode
    it also records the statistic the norm divides by, RMS(x) (LayerNorm: the standard deviation), averaged over
    every token but those at position 0 (see docs/removal.md, "Position 0": the first position's residual is several
    times larger and would set sigma for the rare case). Fixed: x / sigma * gain * output_scale (LayerNorm:
    (x - mean(x)) / sigma ...), sigma one constant for every token -- a per-channel constant scale the fold
    multiplies into the linear layer next to the norm. `sigma` (0 = never measured) and `fixed` are persistent
    buffers, so checkpoints hold them; sigma stays float32 when the model is cast to bf16 (it is a statistic, like
    the norm's own, which is computed in float32).

    `sigma` has `n_sigma` entries: one for a norm over the model width or the full q/k width, one per head for a
    per-head q/k norm (`RemovableHeadNorm`). It is the full vector on every tensor-parallel rank (replicated, like
    the gain of a head norm), so checkpoints and reshards need no split rule for it; a rank's statistic fills its own
    heads' entries and the hooks sum the (sum, count) pairs over the tensor- and data-parallel ranks.
    Subclasses give the per-token statistic (`token_statistic`) and the fixed formula (`fixed_forward`).
    """

    centred = False

    def _init_removable(self, n_sigma: int = 1) -> None:
        self.register_buffer("sigma", torch.zeros(n_sigma))
        self.register_buffer("fixed", torch.zeros(1, dtype=torch.bool))
        self.is_fixed = False  # mirrors `fixed` without a device sync per forward
        self.tracking = False
        self._stat: torch.Tensor | None = None  # [2, n_sigma]: (sum, count) of the statistic since take_statistic()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_fixed:
            return self.fixed_forward(x)
        if self.tracking and self.training:
            self._record(x)
        return super().forward(x)

    def fixed_forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = _at_least_fp32(x)
        if self.centred:
            x32 = x32 - x32.mean(-1, keepdim=True)
        y = (x32 / self.sigma.to(x32.dtype)).type_as(x) * self.fixed_gain()
        return y * self.output_scale if self.output_scale != 1.0 else y

    def fixed_gain(self) -> torch.Tensor:
        """The gain of the fixed form (the norm's own; a TaperNorm's scaling branch has its own)."""
        return self.gain()

    @property
    def measuring(self) -> bool:
        """Whether the removal hooks still take this site's statistic (a switched site's sigma is frozen)."""
        return not self.is_fixed

    def stat_entries(self) -> int:
        """Columns of what `take_statistic` returns: one per entry of sigma."""
        return self.sigma.numel()

    @torch.no_grad()
    def absorb(self, total: torch.Tensor, count: torch.Tensor, momentum: float) -> None:
        """One step's (sum, count) of the statistic, summed over the ranks, into sigma's EMA (the first measurement
        sets it; an entry without a finite measurement keeps its value)."""
        measured = (count > 0) & torch.isfinite(total)
        mean = (total / count.clamp(min=1)).to(self.sigma)
        old = self.sigma
        new = torch.where(old == 0, mean, momentum * old + (1 - momentum) * mean)
        self.sigma.copy_(torch.where(measured.to(old.device), new, old))

    def statistic(self, x: torch.Tensor) -> torch.Tensor:
        """What the live norm divides each token by: sqrt(mean(x^2) + eps), or sqrt(var(x) + eps) (LayerNorm)."""
        x32 = _at_least_fp32(x)
        if self.centred:
            x32 = x32 - x32.mean(-1, keepdim=True)
        return x32.pow(2).mean(-1).add(self.eps).sqrt()

    def token_statistic(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, local entries of sigma]: the statistic of every token (and head, for a per-head norm)."""
        return self.statistic(x).unsqueeze(-1)

    def local_sigma(self, local: int) -> slice:
        """The entries of `sigma` this rank's `local` heads use (all of them unless split per head)."""
        return slice(0, self.sigma.numel())

    @torch.no_grad()
    def _record(self, x: torch.Tensor) -> None:
        s = self.token_statistic(x.detach()).double()  # [B, T, n]
        if s.dim() >= 2 and s.shape[-2] > 1:
            s = s[..., 1:, :]  # [B, T, n]: position 0 left out
        s = s.reshape(-1, s.shape[-1])
        total = torch.zeros(2, self.stat_entries(), dtype=torch.float64, device=s.device)
        part = self.local_sigma(s.shape[-1])
        total[0, part] = s.sum(0)
        total[1, part] = float(s.shape[0])
        self._stat = total if self._stat is None else self._stat + total

    def take_statistic(self) -> torch.Tensor:
        """[2, n_sigma] float64 on the module's device: (sum, count) per entry of sigma recorded since the last call;
        zeros when nothing was (and for the heads of other tensor-parallel ranks)."""
        stat = self._stat
        if stat is None:
            stat = torch.zeros(2, self.stat_entries(), dtype=torch.float64, device=self.sigma.device)
        self._stat = None
        return stat

    @torch.no_grad()
    def set_fixed(self, fixed: bool) -> None:
        if fixed and not bool((self.sigma > 0).all()):
            raise ValueError("a norm site cannot be fixed before its sigma was measured (sigma = 0)")
        self.fixed.fill_(fixed)
        self.is_fixed = bool(fixed)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if not self.fixed.is_meta:
            self.sync_from_buffers()

    def sync_from_buffers(self) -> None:
        """The host-side mirrors from the buffers, after they were written directly (a resume on another layout)."""
        self.is_fixed = bool(self.fixed.item())

    _buffer_dtypes = {"sigma": torch.float32}  # statistics: float32 in a bf16 model too

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name, dtype in self._buffer_dtypes.items():
            buffer = getattr(self, name)
            if buffer.dtype != dtype and not buffer.is_meta:
                setattr(self, name, buffer.to(dtype))
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, removable"


class RemovableRMSNorm(RemovableNorm, RMSNorm):
    def __init__(self, dim: int, eps: float = 1e-6, output_scale: float = 1.0, gain_offset: float = 0.0):
        super().__init__(dim, eps, output_scale, gain_offset)
        self._init_removable()


class RemovableLayerNorm(RemovableNorm, LayerNorm):
    centred = True

    def __init__(self, dim: int, eps: float = 1e-6, output_scale: float = 1.0, gain_offset: float = 0.0):
        super().__init__(dim, eps, output_scale, gain_offset)
        self._init_removable()


TAPER_GAIN = "taper_weight"  # the scaling branch's own gain, gamma~ (a parameter of every TaperNorm site)


class TaperNorm(RemovableNorm):
    """TaperNorm (Kanavalau, Amo Alonso and Lall, arXiv 2602.10408): a norm site tapered by a gate g into a
    sample-independent linear map that folds into the next linear layer (`pretrain remove-norms --method taper`,
    model.taper_norms; docs/removal.md). With the paper's notation, h a token's row vector, D = diag:

        TaperNorm(h; g) = g * h / r(h) * D_gamma + (1 - g) * c * h * D_gamma~,   r(h) = sqrt(||h||^2 / d + eps)

    (LayerNorm: h centred, r its standard deviation; the centring (I - 11^T / d) is itself a fixed linear map, so
    the scaling branch stays sample-independent; lns blocks multiply both branches by 1/sqrt(l)). g is one global
    gate (the hooks set it from the step, `set_gate`); c is one scalar per site, calibrated at the taper start as
    the least-squares match of the two branches from EMAs of the statistics:

        c* = argmin_c E || h / r(h) * D_gamma - c * h * D_gamma ||^2 = E[ ||h D_gamma||^2 / r(h) ] / E[ ||h D_gamma||^2 ]

    and gamma~ (`taper_weight`) is a parameter of its own, set to gamma at the calibration and trained from there.
    The site stores 1/c as `sigma`, so at g = 0 it is the fixed form x / sigma * gamma~ that the removal fold
    multiplies into the next weights. While tracking (before the calibration) it records the per-token numerator
    and denominator of c* and s(h) (r(h), LayerNorm: the standard deviation), position 0 left out as for sigma
    (`calibration`: their EMAs, float32). The EMA of s(h) is the target s_tgt of the paper's fixed-target scale
    loss (`ScaleAnchor`), which a site applies to its input from the taper start on where `scale_loss` is set (the
    final norm, with removal.scale_loss)."""

    # the gate in float64: the blend multiplies by it as a tensor (a new value each step is no new graph for
    # train.compile), and a float64 model computes the paper's formula with the schedule's own g
    _buffer_dtypes = {"sigma": torch.float32, "calibration": torch.float32, "gate": torch.float64}

    def _init_taper(self) -> None:
        self._init_removable()
        self.taper_weight = nn.Parameter(self.gain().detach().clone())  # replaced by gamma at the calibration
        # EMAs of E[||h D_gamma||^2 / r(h)], E[||h D_gamma||^2] (c*) and E[s(h)] (the scale loss's target s_tgt)
        self.register_buffer("calibration", torch.zeros(3))
        self.register_buffer("gate", torch.ones(1, dtype=torch.float64))
        self.gate_value = 1.0  # mirrors `gate` without a device sync per forward
        self.scale_loss = 0.0  # lambda / gas of the scale loss on this site's input (the hooks set it: final norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale_loss and self.training and self.gate_value < 1.0:
            x = ScaleAnchor.apply(x, self.calibration[2], self.scale_loss, self.centred, self.eps)
        if self.is_fixed:  # g = 0: the scaling branch alone
            return self.fixed_forward(x)
        normed = super().forward(x)  # the norm, recording c*'s statistics while tracking
        if self.gate_value == 1.0:
            # gamma~ gets a zero gradient rather than none: every optimizer (torch's AdamW skips a parameter without
            # one, DeepSpeed's ZeRO zero-fills it) then counts the same Adam steps for it
            return normed + self.taper_weight.sum() * 0.0 if self.training else normed
        g = self.gate.to(normed.dtype)
        return normed * g + self.fixed_forward(x) * (1.0 - g)

    def fixed_gain(self) -> torch.Tensor:
        return self.taper_weight

    @property
    def measuring(self) -> bool:
        return self.gate_value == 1.0  # c is calibrated once, at the taper start

    def stat_entries(self) -> int:
        return 3  # numerator and denominator of c*, s(h)

    @torch.no_grad()
    def _record(self, x: torch.Tensor) -> None:
        h = _at_least_fp32(x.detach()).double()
        if self.centred:
            h = h - h.mean(-1, keepdim=True)
        if h.dim() >= 3 and h.shape[-2] > 1:
            h = h[..., 1:, :]  # position 0 left out, as for sigma
        r = h.pow(2).mean(-1).add(self.eps).sqrt()
        weighted = (h * self.gain().detach().double()).pow(2).sum(-1)  # ||h D_gamma||^2
        n = float(r.numel())
        total = torch.tensor([[0.0, 0.0, 0.0], [n, n, n]], dtype=torch.float64, device=h.device)
        total[0, 0], total[0, 1], total[0, 2] = (weighted / r).sum(), weighted.sum(), r.sum()
        self._stat = total if self._stat is None else self._stat + total

    @torch.no_grad()
    def absorb(self, total: torch.Tensor, count: torch.Tensor, momentum: float) -> None:
        """EMAs of c*'s numerator and denominator and of s(h) (each a mean over the step's tokens), and sigma = 1 / c*
        of them."""
        measured = (count > 0).all() & torch.isfinite(total).all()
        mean = (total / count.clamp(min=1)).to(self.calibration)
        old = self.calibration
        new = torch.where(old == 0, mean, momentum * old + (1 - momentum) * mean)
        self.calibration.copy_(torch.where(measured.to(old.device), new, old))
        num, den = self.calibration[0:1], self.calibration[1:2]
        self.sigma.copy_(torch.where(num > 0, den / num.clamp(min=1e-30), self.sigma))

    @torch.no_grad()
    def calibrate(self) -> None:
        """The taper start: gamma~ = gamma (c is the current 1 / sigma)."""
        if not bool((self.sigma > 0).all()):
            raise ValueError("a TaperNorm site cannot start its taper before c was measured")
        self.taper_weight.copy_(self.gain())

    @torch.no_grad()
    def set_gate(self, g: float) -> None:
        """The gate of this step (g = 0: the fixed scaling branch alone, the site `fixed`)."""
        if g == 0.0:
            self.set_fixed(True)
        elif self.is_fixed:
            self.set_fixed(False)
        self.gate.fill_(g)
        self.gate_value = float(g)

    def sync_from_buffers(self) -> None:
        super().sync_from_buffers()
        self.gate_value = float(self.gate.item())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, taper"


class ScaleAnchor(torch.autograd.Function):
    """The paper's fixed-target scale loss L_aux = lambda * E_{b,t} (s(h_{b,t}) - s_tgt)^2 (s = r for RMSNorm, the
    standard deviation for LayerNorm) on h, the final norm's input, as a gradient: the identity forward, and
    backward the gradient of `weight` * L_aux added to the one coming in. So the loss the run logs stays the
    cross-entropy, and the term needs no path of its own to the loss on any layout; `weight` is lambda / gas, as
    DeepSpeed divides each micro-batch's loss by the gradient-accumulation steps."""

    @staticmethod
    def forward(ctx, x, target, weight, centred, eps):
        ctx.save_for_backward(x, target)
        ctx.weight, ctx.centred, ctx.eps = weight, centred, eps
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        x, target = ctx.saved_tensors
        with torch.enable_grad():
            h = x.detach().requires_grad_(True)
            h32 = _at_least_fp32(h)
            if ctx.centred:
                h32 = h32 - h32.mean(-1, keepdim=True)
            s = h32.pow(2).mean(-1).add(ctx.eps).sqrt()
            aux = ctx.weight * (s - target.to(s.dtype)).pow(2).mean()
            (extra,) = torch.autograd.grad(aux, h)
        return grad + extra.to(grad.dtype), None, None, None, None


class TaperRMSNorm(TaperNorm, RMSNorm):
    def __init__(self, dim: int, eps: float = 1e-6, output_scale: float = 1.0, gain_offset: float = 0.0):
        super().__init__(dim, eps, output_scale, gain_offset)
        self._init_taper()


class TaperLayerNorm(TaperNorm, LayerNorm):
    centred = True

    def __init__(self, dim: int, eps: float = 1e-6, output_scale: float = 1.0, gain_offset: float = 0.0):
        super().__init__(dim, eps, output_scale, gain_offset)
        self._init_taper()


class RemovableHeadNorm(RemovableNorm, HeadNorm):
    """A per-head q/k norm (`model.qk_norm=head`, x [B, T, heads, E]) as a removal site with one sigma per head.

    Per head, because the fold multiplies each head's own q (or k) rows of the fused projection (separate rows, so
    any per-head constant folds exactly) and heads differ: the live norm brings every head's q to RMS 1 per token,
    whatever its projection's scale; one sigma shared by the heads would leave the heads' relative sizes, and so each
    head's attention temperature, to their raw scales after the switch, where per-head sigmas keep each head's
    average at what its live norm gave. `sigma` holds all heads of the model on every TP rank (`local_sigma`)."""

    output_scale = 1.0  # no fixed multiplier (the fold reads it as for the other norms)

    def __init__(self, dim: int, eps: float, centred: bool, tp: TensorParallel | None, heads: int,
                 gain_offset: float = 0.0):
        super().__init__(dim, eps, centred, tp, gain_offset)
        self._init_removable(heads)

    def token_statistic(self, x: torch.Tensor) -> torch.Tensor:
        return self.statistic(x)  # over head_dim, the last dim: [B, T, heads]

    def local_sigma(self, local: int) -> slice:
        first = 0 if self.tp is None else self.tp.rank * local
        return slice(first, first + local)

    def fixed_forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = _at_least_fp32(x)
        if self.centred:
            x32 = x32 - x32.mean(-1, keepdim=True)
        sigma = self.sigma[self.local_sigma(x.shape[-2])].to(x32.dtype).unsqueeze(-1)  # [heads, 1]
        return (x32 / sigma).type_as(x) * self.gain()


class RemovableWidthNorm(RemovableNorm, WidthNorm):
    """A full-width q/k norm (`model.qk_norm=full`) as a removal site: one sigma for the whole q (or k) vector of a
    token, its statistic summed over the tensor-parallel ranks like the live norm's."""

    output_scale = 1.0  # no fixed multiplier (the fold reads it as for the other norms)

    def __init__(self, full_width: int, eps: float, centred: bool, tp: TensorParallel | None,
                 gain_offset: float = 0.0):
        super().__init__(full_width, eps, centred, tp, gain_offset)
        self._init_removable()

    def token_statistic(self, x: torch.Tensor) -> torch.Tensor:
        return self.mean_square(self.flat(x)).add(self.eps).sqrt()  # [B, T, 1]: what the live norm divides by

    def fixed_forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.flat(x)
        return ((flat / self.sigma.to(flat.dtype)).type_as(x) * self.gain()).view_as(x)


class DyT(nn.Module):
    """Dynamic Tanh (Zhu et al., 2025): gamma * tanh(alpha * x) (+ beta with `bias`), a learnable scalar alpha.
    gamma = weight + gain_offset, as the norms' gains (model.norm_gain)."""

    def __init__(self, dim: int, alpha_init: float = 0.5, bias: bool = False, gain_offset: float = 0.0):
        super().__init__()
        self.dim, self.alpha_init, self.gain_offset = dim, float(alpha_init), gain_offset  # YAML may give an int
        self.alpha = nn.Parameter(torch.full((1,), self.alpha_init))
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - gain_offset))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def gain(self) -> torch.Tensor:
        return self.weight + self.gain_offset if self.gain_offset else self.weight

    def squash(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.alpha * x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gain() * self.squash(x)
        return y if self.bias is None else y + self.bias

    def reset_parameters(self) -> None:
        nn.init.constant_(self.alpha, self.alpha_init)
        nn.init.constant_(self.weight, 1.0 - self.gain_offset)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{self.dim}, alpha_init={self.alpha_init}, bias={self.bias is not None}"


class Derf(DyT):
    """Dynamic erf (Chen et al., 2025, arXiv 2512.10938; zlab-princeton/Derf): gamma * erf(alpha * x + s) + beta,
    learnable scalars alpha (per-site initial value, as DyT's) and shift s (from 0), per-channel gamma and beta (the
    reference always has beta)."""

    def __init__(self, dim: int, alpha_init: float = 0.5, gain_offset: float = 0.0):
        super().__init__(dim, alpha_init, bias=True, gain_offset=gain_offset)
        self.shift = nn.Parameter(torch.zeros(1))

    def squash(self, x: torch.Tensor) -> torch.Tensor:
        return torch.erf(self.alpha * x + self.shift)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.zeros_(self.shift)


class EmbeddingScale(nn.Module):
    """A learnable scalar times the token embedding, from `init` (dyt, derf: `dyt_embedding_scale_init`)."""

    def __init__(self, init: float):
        super().__init__()
        self.init = float(init)
        self.scale = nn.Parameter(torch.full((1,), self.init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def reset_parameters(self) -> None:
        nn.init.constant_(self.scale, self.init)

    def extra_repr(self) -> str:
        return f"init={self.init:.4g}"


class Scale(nn.Module):
    """A fixed multiplier: no parameter, no statistic (ln_free's depth-muP multipliers)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def extra_repr(self) -> str:
        return f"{self.scale:.4g}"


class ScalelessRMSNorm(nn.Module):
    """RMSNorm over the last dim without a gain, in fp32, times a fixed `factor`: Gemma 4's v norm (`with_scale=False`,
    per head over head_dim), Muse Glimmer's q/k norm (q times its `qk_scale_factor`) and its embedding norm. No
    parameter, and a statistic of the last dim only: a per-head norm is exact on any tensor-parallel split of the
    heads."""

    def __init__(self, dim: int, eps: float = 1e-6, factor: float = 1.0):
        super().__init__()
        self.dim, self.eps, self.factor = dim, eps, factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(_at_least_fp32(x), (self.dim,), eps=self.eps).type_as(x)
        return y * self.factor if self.factor != 1.0 else y

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, no gain" + (f", factor={self.factor:.4g}" if self.factor != 1.0 else "")


class LayerScalar(nn.Module):
    """A learnable scalar times the block's output (model.layer_scalar; Gemma 4's `layer_scalar`, which multiplies the
    whole residual stream after the block's last add), from 1. Replicated under tensor parallelism: every rank holds
    the same block output, so each computes the full gradient."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))  # shape [1]: DeepSpeed broadcasts parameters as bytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.scale)


# model.norm_type -> its class (models/norms.py NORM_TYPES names them for the config).
NORM_CLASSES = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}
REMOVABLE_NORM_CLASSES = {"rmsnorm": RemovableRMSNorm, "layernorm": RemovableLayerNorm}
TAPER_NORM_CLASSES = {"rmsnorm": TaperRMSNorm, "layernorm": TaperLayerNorm}
