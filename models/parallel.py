"""The tensor-parallel seam.

`tp=None` (the default, and what a notebook gets): plain `nn.Linear` / `nn.Embedding` and
`F.cross_entropy`, no torch.distributed anywhere. With a `TensorParallel` the same constructors return
megatron-core's `ColumnParallelLinear` / `RowParallelLinear` / `VocabParallelEmbedding` and the loss goes
through `vocab_parallel_cross_entropy` (which reads the TP group from megatron's `parallel_state`, so that
must be initialized, as `pretrain/train/engine.py` does).

Every weight made here carries a `TPSplit` describing how its full (TP = 1) tensor maps onto this rank's
shard. Weight init (models/llama.py) and the TP <-> full state-dict conversion below both use it, so a
model built from the same seed is the same model at any TP size.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # the label of a position that takes no loss and is not counted (padding, prompts)


@dataclass(frozen=True)
class TensorParallel:
    """A tensor-parallel group and this process's place in it."""

    group: object  # torch.distributed.ProcessGroup
    size: int
    rank: int

    @classmethod
    def from_parallel_state(cls) -> "TensorParallel | None":
        """The TP group of megatron's initialized `parallel_state`, or None when TP = 1."""
        from megatron.core import parallel_state  # megatron-core only under tensor parallelism (a TP = 1 model runs without it)

        size = parallel_state.get_tensor_model_parallel_world_size()
        if size == 1:
            return None
        return cls(parallel_state.get_tensor_model_parallel_group(), size, parallel_state.get_tensor_model_parallel_rank())


@dataclass(frozen=True)
class TPSplit:
    """How a full tensor of `full_shape` is split over `size` ranks along `dim` (rank r keeps piece r)."""

    full_shape: tuple[int, ...]
    dim: int = 0
    size: int = 1
    rank: int = 0

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        return full if self.size == 1 else full.chunk(self.size, dim=self.dim)[self.rank]

    def merge(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of `shard` given every rank's shard in rank order."""
        return shards[0] if self.size == 1 else torch.cat(shards, dim=self.dim)


def _tp_size(tp: TensorParallel | None) -> int:
    return 1 if tp is None else tp.size


def _mark(weight: nn.Parameter, full_shape: tuple[int, ...], dim: int, tp: TensorParallel | None):
    weight.tp_split = TPSplit(tuple(full_shape), dim, _tp_size(tp), 0 if tp is None else tp.rank)
    if tp is not None:
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes  # megatron-core only under tensor parallelism (a TP = 1 model runs without it)

        # DeepSpeed's gradient-norm code reads these to count sharded weights on every rank and replicated ones
        # once. megatron-core < 0.17 sets them only when it initializes the weight itself (we init in
        # models.llama); later releases set them in the layer's constructor and assert on a second call.
        if getattr(weight, "tensor_model_parallel", False):
            if (weight.partition_dim, weight.partition_stride) != (dim, 1):
                raise RuntimeError(f"megatron-core marked a weight split along dim {weight.partition_dim} "
                                   f"(stride {weight.partition_stride}); normlab splits it along dim {dim}")
        else:
            for attribute in ("tensor_model_parallel", "partition_dim", "partition_stride"):
                if hasattr(weight, attribute):
                    delattr(weight, attribute)  # megatron's defaults for a replicated weight; it asserts on them
            set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=dim, stride=1)
    return weight


def _divide(n: int, tp: TensorParallel | None, what: str) -> int:
    size = _tp_size(tp)
    if n % size:
        raise ValueError(f"{what}={n} is not divisible by parallel.tp={size}; choose a tp that divides it")
    return n // size


def _megatron_config(tp: TensorParallel):
    from megatron.core.model_parallel_config import ModelParallelConfig  # megatron-core only under tensor parallelism (a TP = 1 model runs without it)

    # Weights are created uninitialized and filled by models.llama.init_weights (same values at any TP).
    return ModelParallelConfig(
        tensor_model_parallel_size=tp.size, use_cpu_initialization=True, perform_initialization=False,
    )


def _quiet_megatron():
    # megatron-core warns at import when Transformer Engine / Apex are absent; we use neither.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron.core.tensor_parallel as mtp  # noqa: F401
    return mtp


def _no_init(w):
    return w


@functools.cache  # one class per megatron class: train.compile guards on the class of each layer it traces, and a
# class per layer made every TP linear of a compiled block a recompilation (past dynamo's limit of 8: then eager)
def _single_output(cls):
    """A megatron layer that returns only its output and keeps no `_extra_state` in its state dict.

    Only `get_extra_state` is reset: megatron registers a load_state_dict pre-hook that adds
    `<prefix>_extra_state` to every state dict loaded into the layer, and megatron's own (no-op)
    `set_extra_state` must stay to consume it, or every strict load into a TP model fails.
    """

    class Layer(cls):
        get_extra_state = nn.Module.get_extra_state

        def forward(self, x):
            out, _bias = super().forward(x)
            return out

    Layer.__name__ = Layer.__qualname__ = cls.__name__
    return Layer


def column_linear(in_features: int, out_features: int, tp: TensorParallel | None) -> nn.Module:
    """y = x W^T with W's output rows split across TP ranks."""
    if tp is None:
        layer = nn.Linear(in_features, out_features, bias=False)
    else:
        mtp = _quiet_megatron()
        _divide(out_features, tp, "output features")
        layer = _single_output(mtp.ColumnParallelLinear)(
            in_features, out_features, config=_megatron_config(tp), init_method=_no_init, bias=False,
            gather_output=False, tp_group=tp.group,
        )
    _mark(layer.weight, (out_features, in_features), 0, tp)
    return layer


def row_linear(in_features: int, out_features: int, tp: TensorParallel | None) -> nn.Module:
    """y = x W^T with W's input columns split across TP ranks; the output is summed over the group."""
    if tp is None:
        layer = nn.Linear(in_features, out_features, bias=False)
    else:
        mtp = _quiet_megatron()
        layer = _single_output(mtp.RowParallelLinear)(
            in_features, out_features, config=_megatron_config(tp), init_method=_no_init, bias=False,
            input_is_parallel=True, skip_bias_add=False, tp_group=tp.group,
        )
    _mark(layer.weight, (out_features, in_features), 1, tp)
    return layer


def vocab_embedding(vocab_size: int, dim: int, tp: TensorParallel | None) -> nn.Module:
    if tp is None:
        layer = nn.Embedding(vocab_size, dim)
    else:
        mtp = _quiet_megatron()
        _divide(vocab_size, tp, "model.vocab_size")
        layer = mtp.VocabParallelEmbedding(
            vocab_size, dim, init_method=_no_init, config=_megatron_config(tp), tp_group=tp.group
        )
    _mark(layer.weight, (vocab_size, dim), 0, tp)
    return layer


class _SumGradOverTP(torch.autograd.Function):
    """Identity forward; the gradient summed over the TP group backward (a replicated weight that each rank applies
    to its own heads only: its full gradient is the sum of the ranks' parts)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class HeadNorm(nn.Module):
    """RMSNorm (or bias-free LayerNorm with `centred`) over the last dim (head_dim), one gain shared by every head
    and replicated over the TP ranks; each rank holds some heads, so the gain's gradient is summed over the group."""

    def __init__(self, dim: int, eps: float, centred: bool, tp: TensorParallel | None, gain_offset: float = 0.0):
        super().__init__()
        self.dim, self.eps, self.centred, self.tp, self.gain_offset = dim, eps, centred, tp, gain_offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - gain_offset))

    def gain(self) -> torch.Tensor:
        """weight + gain_offset (model.norm_gain; models/norms.py RMSNorm)."""
        w = self.weight if self.tp is None else _SumGradOverTP.apply(self.weight, self.tp.group)
        return w + self.gain_offset if self.gain_offset else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        norm = F.layer_norm if self.centred else F.rms_norm
        return norm(x32, (self.dim,), eps=self.eps).type_as(x) * self.gain()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, 1.0 - self.gain_offset)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, {'layernorm' if self.centred else 'rmsnorm'}"


class WidthNorm(nn.Module):
    """RMSNorm (or bias-free LayerNorm with `centred`) over the last two dims [..., heads, E] taken as one vector of
    `full_width` = all heads x E, its gain split over the TP ranks with the heads: each rank holds its heads' share
    and the statistics are summed over the TP group (an all-reduce whose backward is an all-reduce too: every
    rank's normalized slice depends on every rank's input). Computed in at least fp32, like the other norms."""

    def __init__(self, full_width: int, eps: float, centred: bool, tp: TensorParallel | None,
                 gain_offset: float = 0.0):
        super().__init__()
        self.full_width, self.eps, self.centred, self.tp, self.gain_offset = full_width, eps, centred, tp, gain_offset
        self.weight = nn.Parameter(torch.full((_divide(full_width, tp, "the q/k width"),), 1.0 - gain_offset))
        self.weight.init_value = 1.0 - gain_offset  # models.llama.init_weights: a gain, not a random matrix
        _mark(self.weight, (full_width,), 0, tp)

    def gain(self) -> torch.Tensor:
        """weight + gain_offset (model.norm_gain; models/norms.py RMSNorm)."""
        return self.weight + self.gain_offset if self.gain_offset else self.weight

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.tp is None else dist_fn.all_reduce(t, group=self.tp.group)

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """[..., local width] in at least fp32, centred over the full width with `centred`."""
        flat = x.flatten(-2).to(torch.promote_types(x.dtype, torch.float32))
        if self.centred:
            flat = flat - self._sum(flat.sum(-1, keepdim=True)) / self.full_width
        return flat

    def mean_square(self, flat: torch.Tensor) -> torch.Tensor:
        """[..., 1]: mean of flat^2 over the full width (all TP ranks' heads)."""
        return self._sum(flat.pow(2).sum(-1, keepdim=True)) / self.full_width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.flat(x)
        y = (flat * torch.rsqrt(self.mean_square(flat) + self.eps)).type_as(x) * self.gain()
        return y.view_as(x)

    def extra_repr(self) -> str:
        return f"{self.full_width}, eps={self.eps}, {'layernorm' if self.centred else 'rmsnorm'}"


class SplitScale(nn.Module):
    """A learnable per-channel scale, split over the TP ranks with the channels it scales (nGPT's scaling vectors,
    Loshchilov et al., 2024, sec. 2.6): stored as s from `init_scaling` and applied as s * init_value / init_scaling
    (times a fixed `multiplier`), so that Adam moves it at the paper's rate. `shape`: how the local vector is viewed
    against the input (default: the last dim)."""

    def __init__(self, full_width: int, init_value: float, init_scaling: float, tp: TensorParallel | None,
                 shape: tuple[int, ...] = (-1,), multiplier: float = 1.0):
        super().__init__()
        self.shape, self.factor = shape, init_value / init_scaling * multiplier
        self.weight = nn.Parameter(torch.full((_divide(full_width, tp, "the scaled width"),), init_scaling))
        self.weight.init_value = init_scaling  # models.llama.init_weights: a scale, not a random matrix
        _mark(self.weight, (full_width,), 0, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.weight * self.factor).to(x.dtype).view(self.shape)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.tp_split.full_shape)[0]}, factor={self.factor:.4g}"


def tied_logits(x: torch.Tensor, embedding_weight: torch.Tensor, tp: TensorParallel | None) -> torch.Tensor:
    """Logits from the (vocab-parallel) input embedding matrix; vocab-sharded under TP."""
    if tp is not None:
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region  # megatron-core only under tensor parallelism (a TP = 1 model runs without it)

        # Identity forward, all-reduce of the input gradient backward (as Megatron's parallel_lm_logits).
        x = copy_to_tensor_model_parallel_region(x, group=tp.group)
    return F.linear(x, embedding_weight)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, tp: TensorParallel | None,
                  ignore_index: int = IGNORE_INDEX, reduction: str = "mean") -> torch.Tensor:
    """Next-token loss over labels != ignore_index; logits may be vocab-sharded under TP.

    reduction "mean" (training): the mean over those tokens; "sum" (validation, which divides by the token
    count over all its batches itself): their sum, 0 for a batch whose labels are all ignore_index."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if tp is None:
        return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=ignore_index,
                               reduction=reduction)
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy  # megatron-core only under tensor parallelism (a TP = 1 model runs without it)

    mask = labels != ignore_index
    # megatron's kernel subtracts the max and exponentiates in place: never hand it the caller's tensor.
    logits = logits.float() if logits.dtype != torch.float32 else logits.clone()
    per_token = vocab_parallel_cross_entropy(logits, labels.masked_fill(~mask, 0))
    total = (per_token * mask).sum()
    return total if reduction == "sum" else total / mask.sum().clamp(min=1)


# Logit elements one chunk of the fused loss holds: 2**25 (128 MiB in fp32), e.g. 1,048 tokens at V = 32,000.
LOSS_CHUNK_ELEMENTS = 2 ** 25


def chunked_cross_entropy(logits_fn, x: torch.Tensor, labels: torch.Tensor, tp: TensorParallel | None, vocab: int,
                          reduction: str = "mean", ignore_index: int = IGNORE_INDEX,
                          chunk_elements: int | None = None) -> torch.Tensor:
    """`cross_entropy(logits_fn(x), labels)` without the [B, T, V] logits: the tokens go through the head and the loss
    in chunks of about `chunk_elements` / `vocab` (this rank's vocabulary share), each chunk's fp32 logits made,
    reduced to a loss sum and dropped, and made again in backward (non-reentrant checkpointing: the gradient flows
    through the same graph, so a weight used by every chunk still receives one gradient). One chunk's logits and
    their gradient are held at a time instead of the whole batch's; the result equals the unfused loss up to the
    order of the sum. Under TP each chunk is the vocab-parallel loss, its all-reduces made by every rank alike."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    x, labels = x.reshape(-1, x.shape[-1]), labels.reshape(-1)  # [N, D], [N]
    step = max(1, (chunk_elements or LOSS_CHUNK_ELEMENTS) // vocab)

    def chunk_loss(xc: torch.Tensor, lc: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits_fn(xc), lc, tp, ignore_index=ignore_index, reduction="sum")

    sums = []
    for start in range(0, labels.numel(), step):
        xc, lc = x[start:start + step], labels[start:start + step]
        if torch.is_grad_enabled():  # no RNG inside (no dropout): nothing to replay
            sums.append(torch.utils.checkpoint.checkpoint(chunk_loss, xc, lc, use_reentrant=False,
                                                          preserve_rng_state=False))
        else:
            sums.append(chunk_loss(xc, lc))
    total = torch.stack(sums).sum() if len(sums) > 1 else sums[0]
    return total if reduction == "sum" else total / (labels != ignore_index).sum().clamp(min=1)


def liger_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, reduction: str = "mean",
                        ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """`cross_entropy(x @ weight^T, labels)` by Liger's fused linear cross-entropy (liger-kernel, Triton, CUDA only),
    which makes each chunk's logits and their gradient in one pass and never holds [B, T, V]. A whole-vocabulary
    head only (no TP): `HeadPart` routes here when `recompute(..., liger=True)` found it applicable. Liger sums;
    the mean divides by the counted tokens as `cross_entropy` does (0 tokens: 0, not NaN)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy  # CUDA only: never imported on CPU

    x, labels = x.reshape(-1, x.shape[-1]), labels.reshape(-1)  # [N, D], [N]
    total = liger_fused_linear_cross_entropy(x, weight, labels, ignore_index=ignore_index, reduction="sum").float()
    return total if reduction == "sum" else total / (labels != ignore_index).sum().clamp(min=1)


def liger_available() -> bool:
    """Whether Liger's kernel can run here: liger-kernel installed and a CUDA device (Triton has no CPU backend)."""
    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


def shard_state_dict(full: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A full (TP = 1) state dict cut down to the shards `model` (built at any TP) holds."""
    splits = tp_splits(model)
    return {k: (splits[k].shard(v) if k in splits else v) for k, v in full.items()}


def merge_state_dicts(per_rank: list[dict[str, torch.Tensor]], model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (TP = 1) state dict from every TP rank's state dict, in rank order."""
    splits = tp_splits(model)
    return {k: (splits[k].merge([sd[k] for sd in per_rank]) if k in splits else v) for k, v in per_rank[0].items()}


def tp_splits(model: nn.Module) -> dict[str, TPSplit]:
    return {name: p.tp_split for name, p in model.named_parameters() if hasattr(p, "tp_split")}
