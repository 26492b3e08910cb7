"""What the diagnostics measure, from a model of any layout: activation statistics of one micro-batch per block
(the table's activation entries, computed by pretrain/diagnostics/stats.py) and gradient square sums per block and
group."""

from __future__ import annotations

import torch
from torch import nn

from models.llama import Block
from pretrain.diagnostics.stats import (ACTIVATION_STATS, GRADIENT_GROUPS, STREAM_GRADIENT_STAT, STREAM_ROWS,
                                       STREAM_STATS, stream_grad_norm)
from pretrain.diagnostics.taps import BlockActivations, BlockTaps

# Gradient groups after the L blocks: GRADIENT_GROUPS in order, then everything else (counted in the global norm).
EMBEDDING, FINAL_NORM, HEAD, OTHER = range(len(GRADIENT_GROUPS) + 1)
N_EXTRA_GROUPS = len(GRADIENT_GROUPS) + 1


def local_blocks(model: nn.Module) -> dict[int, nn.Module]:
    """{0-based global block index: Block} for the blocks this rank holds (plain Llama or PipelineModule)."""
    if hasattr(model, "blocks") and isinstance(model.blocks, nn.ModuleList):  # Llama
        return dict(enumerate(model.blocks))
    # PipelineModule: layer i of [embedding, block 1..L, final norm, head] is the child named str(i).
    children = model.named_children()
    return {int(name) - 1: child for name, child in children if name.isdigit() and isinstance(child, Block)}


def parameter_groups(model: nn.Module, n_layers: int) -> list[tuple[nn.Parameter, int]]:
    """(parameter, group) for every parameter: group l < L is block l (0-based), then L + EMBEDDING, ..."""
    group_of: dict[int, int] = {}
    for index, block in local_blocks(model).items():
        for p in block.parameters():
            group_of[id(p)] = index
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        # Llama and the pipeline's stages name these parts alike (models/llama.py's EmbeddingPart, ReadoutPart,
        # HeadPart); emb_out (dyt's scalar, peri_ln's norm) and logit_scale (ngpt) belong to the embedding and the head,
        # streams_out (mHC's learned collapse of the residual streams) to the readout with the final norm
        if leaf in ("tok_emb", "emb_out"):
            group = EMBEDDING
        elif leaf in ("final_norm", "streams_out"):
            group = FINAL_NORM
        elif leaf in ("head", "logit_scale"):
            group = HEAD
        else:
            continue
        for p in module.parameters():
            group_of.setdefault(id(p), n_layers + group)
    return [(p, group_of.get(id(p), n_layers + OTHER)) for p in model.parameters()]


class ActivationProbe:
    """Per-block activation statistics of the first forward of each block after `arm()`, and with n > 1 residual
    streams the per-stream ones.

        probe = ActivationProbe(local_blocks(model), n_layers, n_streams)
        probe.arm(); model(tokens); stats = probe.result()   # [len(ACTIVATION_STATS), n_layers], zeros elsewhere
        per_stream = probe.stream_result()                   # [len(STREAM_ROWS), n_layers, n_streams]

    The per-stream gradient row (grad_norm_stream) is filled in the backward pass of the measured forward, times
    `grad_scale` (the training loop's micro-batches per data-parallel rank, which DeepSpeed divides each micro-batch's
    loss by); NaN where the block's input gradient was not computed (a forward without backward).
    """

    def __init__(self, blocks: dict[int, nn.Module], n_layers: int, n_streams: int = 1, grad_scale: float = 1.0):
        self.blocks, self.n_layers, self.n_streams, self.grad_scale = blocks, n_layers, n_streams, grad_scale
        self.measured: dict[int, torch.Tensor] = {}
        self.measured_streams: dict[int, torch.Tensor] = {}
        self.measured_grads: dict[int, torch.Tensor] = {}
        self.taps: list[BlockTaps] = []

    def arm(self) -> None:
        self.disarm()
        self.measured.clear()
        self.measured_streams.clear()
        self.measured_grads.clear()
        on_input_grad = self._measure_grad if self.n_streams > 1 else None
        self.taps = [BlockTaps(i, b, self._measure, once=True, on_input_grad=on_input_grad)
                     for i, b in sorted(self.blocks.items())]

    def disarm(self) -> None:
        for taps in self.taps:
            taps.remove()
        self.taps = []

    def _measure(self, b: BlockActivations) -> None:
        # reduced on the device to one scalar per statistic: one host transfer per measured step, in result()
        self.measured[b.index] = torch.stack([s.compute(b).to(b.y.dtype) for s in ACTIVATION_STATS])
        if b.states is not None and self.n_streams > 1:  # (attn_res's state is a history, not streams: n_streams 1)
            self.measured_streams[b.index] = torch.stack([s.compute(b).to(b.y.dtype) for s in STREAM_STATS])

    def _measure_grad(self, index: int, grad: torch.Tensor) -> None:
        self.measured_grads[index] = stream_grad_norm(grad) * self.grad_scale

    def result(self, device=None, dtype=torch.float64) -> torch.Tensor:
        out = torch.zeros(len(ACTIVATION_STATS), self.n_layers, dtype=dtype, device=device)
        for index, stats in self.measured.items():
            out[:, index] = stats.to(device=out.device, dtype=dtype)
        return out

    def stream_result(self, device=None, dtype=torch.float64) -> torch.Tensor:
        out = torch.zeros(len(STREAM_ROWS), self.n_layers, self.n_streams, dtype=dtype, device=device)
        rows = [STREAM_ROWS.index(s.name) for s in STREAM_STATS]
        grad_row = STREAM_ROWS.index(STREAM_GRADIENT_STAT)
        for index, stats in self.measured_streams.items():
            out[rows, index] = stats.to(device=out.device, dtype=dtype)
            out[grad_row, index] = self.measured_grads.get(index, torch.full((self.n_streams,), float("nan"))).to(
                device=out.device, dtype=dtype)
        return out


def counted(p: nn.Parameter, tp_rank: int) -> bool:
    """Whether this rank counts p in a model-parallel sum: TP shards on every rank, replicated weights on TP
    rank 0, pipeline-tied copies only on their owning stage."""
    if getattr(p, "ds_pipe_replicated", False):
        return False
    return tp_rank == 0 or bool(getattr(p, "tensor_model_parallel", False))


def grad_square_sums(entries: list[tuple[nn.Parameter, int]], n_groups: int, tp_rank: int = 0,
                     get_grad=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of squared gradient entries per group, number of parameters per group), float64, this rank's share.

    `get_grad(p)` reads a gradient (default p.grad); it is called for every parameter in order, counted or
    not, because DeepSpeed's ZeRO helper is a collective over the data-parallel group."""
    grads, groups, counts = [], [], [0] * n_groups
    for p, group in entries:
        g = p.grad if get_grad is None else get_grad(p)
        if not counted(p, tp_rank):
            continue
        counts[group] += 1
        if g is not None:
            grads.append(g.detach())
            groups.append(group)
    device = grads[0].device if grads else (entries[0][0].device if entries else None)
    sq = torch.zeros(n_groups, dtype=torch.float64, device=device)
    if grads:
        norms = torch.stack([n.to(torch.float64) for n in torch._foreach_norm(grads)])
        sq.index_add_(0, torch.tensor(groups, device=device), norms.square())
    return sq, torch.tensor(counts, dtype=torch.float64, device=device)
