"""Reading a block's activations through its declared slots (models/norms.py `SLOTS`), for the in-loop diagnostics
and the depth analysis alike.

A block computes h = attn_post_norm(alpha x + a), y = mlp_post_norm(alpha h + m) with x its input,
a = attn_out_norm(Attn(attn_norm(x))) and m = mlp_out_norm(MLP(mlp_norm(h))). `BlockTaps` hooks the block (x, y),
the output of its `attn_out_norm` slot (a), the output of `attn_post_norm` (h) and the output of `mlp_out_norm` (m);
the slots are modules in every scheme (nn.Identity where a scheme has no norm), so every scheme is read the same way.

With residual streams (model.residual, models/streams.py) x, h and y are states [B, T, n, D]; the activations hold
the collapsed state, their sum over the streams (`models.streams.summed`: under mHC's doubly-stochastic mix it moves
as one residual stream does), a, m the sublayers' outputs before the streams' write, and `mix` the sublayers'
mixing matrices, recomputed from their input states by the residual slot's `weights`, and `states` the states
themselves for the per-stream statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from models.norms import ATTN_OUT, ATTN_POST, MLP_OUT
from models.streams import summed
from pretrain import compat


@dataclass
class BlockActivations:
    """One block's forward, in at least fp32 (a float64 model stays float64), detached: [B, T, D] each (x, h, y: the
    streams' sum where the residual is a state of streams)."""

    index: int  # 0-based block index in the model
    x: torch.Tensor  # block input
    y: torch.Tensor  # block output
    a: torch.Tensor  # attention branch, as added to the residual
    h: torch.Tensor  # residual the MLP branch is added to
    m: torch.Tensor  # MLP branch, as added to the residual
    alpha: float  # the scheme's residual weight (1 except deepnorm)
    # The residual streams' mixing matrices of the two sublayers, [2, B, T, n, n] (comb: stream j to stream k at
    # [..., j, k]); None for one stream, whose mix is the 1 x 1 matrix [alpha].
    mix: torch.Tensor | None = None
    # The states themselves, (x, h, y) [B, T, n, D] each, for the per-stream statistics; None for one stream.
    states: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def _state(x) -> torch.Tensor:
    """The residual ([B, T, D] or a state [B, T, n, D]) detached, in at least fp32."""
    if isinstance(x, tuple):  # a pipeline block's (x, positions, doc_ids) of packed SFT rows (models/pipeline.py)
        x = x[0]
    return x.detach().to(torch.promote_types(x.dtype, torch.float32))


def _wide(x) -> torch.Tensor:
    return summed(_state(x))


def _eager(fn):
    """A hook that runs eagerly and without autograd, also inside a torch.compile'd block (train.compile): dynamo
    graph-breaks around it instead of tracing its side effects (the compiled block is reused when no hook is set)."""
    return torch.compiler.disable(torch.no_grad()(fn), recursive=True)


class BlockTaps:
    """Forward hooks on one block's slots; `on_block(BlockActivations)` runs at the end of each block forward.

    With `once`, the hooks remove themselves after the first forward (the diagnostics measure one micro-batch per
    measured step). A compiled block (train.compile) would not run hooks added after compilation, so while the
    taps are on, the block runs eagerly; its compiled version is restored by `remove()`."""

    def __init__(self, index: int, block: nn.Module, on_block: Callable[[BlockActivations], None], once: bool = False,
                 on_input_grad: Callable[[int, torch.Tensor], None] | None = None):
        """`on_input_grad(index, grad)`: with residual streams, called in the backward pass of each measured forward
        with the gradient of the block's input state [B, T, n, D] (detached, in at least fp32)."""
        self.index, self.block, self.on_block, self.once = index, block, on_block, once
        self.on_input_grad = on_input_grad
        self.alpha = float(getattr(block, "residual_alpha", 1.0))
        self.parts: dict[str, torch.Tensor] = {}
        self.compiled = compat.suspend_compiled(block)
        self.handles = [
            getattr(block, ATTN_OUT).register_forward_hook(self._keep_output("a")),
            getattr(block, ATTN_POST).register_forward_hook(self._keep_output("h")),
            getattr(block, ATTN_POST).register_forward_hook(self._keep_state()),
            getattr(block, MLP_OUT).register_forward_hook(self._keep_output("m")),
            block.register_forward_hook(self._block),
        ]

    def _keep_output(self, key: str):
        @_eager
        def hook(module, args, output):
            self.parts[key] = _wide(output)
        return hook

    def _keep_state(self):
        @_eager
        def hook(module, args, output):
            self.parts["h_state"] = output
        return hook

    @_eager
    def _block(self, module, args, output):
        nan = torch.full((), float("nan"))  # a slot hook that did not run (a block without that branch)
        parts = {k: self.parts.get(k, nan) for k in ("a", "h", "m")}
        mix, states, x = None, None, _state(args[0])
        if x.ndim == 4:  # residual streams: the states themselves, for the per-stream statistics
            states = (x, _state(self.parts["h_state"]), _state(output))
            graph_input = args[0][0] if isinstance(args[0], tuple) else args[0]
            if self.on_input_grad is not None and graph_input.requires_grad:
                graph_input.register_hook(self._input_grad)
        if hasattr(module.residual, "weights"):  # residual streams: the two sublayers' mixes, from their inputs
            inputs = (args[0][0] if isinstance(args[0], tuple) else args[0], self.parts["h_state"])
            mix = torch.stack([module.residual.weights(state, s)["comb"].detach().to(parts["a"].dtype)
                               for s, state in enumerate(inputs)])
        self.parts = {}
        if self.once:
            self.remove()
        self.on_block(BlockActivations(self.index, summed(x), _wide(output), alpha=self.alpha, mix=mix,
                                       states=states, **parts))

    def _input_grad(self, grad: torch.Tensor) -> None:
        """A tensor hook: runs once, in the backward pass through the block's input (also with activation
        checkpointing: the hook is on the tensor kept for the recomputation, not on a recomputed one)."""
        with torch.no_grad():
            self.on_input_grad(self.index, _state(grad))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        compat.restore_compiled(self.block, self.compiled)
        self.compiled = None
