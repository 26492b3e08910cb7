"""Per-layer diagnostics: residual variance, branch contributions, angular distance and gradient norms.

Every `diagnostics.interval` optimizer steps (0 = off: nothing is registered or wrapped) the training loop
measures, for each block l = 1..L of the model, and rank 0 appends one line to run.dir/layer_stats.jsonl and
writes TensorBoard scalars.

Definitions
-----------
A block computes (models/norms.py)  h = attn_post_norm(alpha x + a),  y = mlp_post_norm(alpha h + m)  with
x the block input, a = attn_out_norm(Attn(attn_norm(x))) and m = mlp_out_norm(MLP(mlp_norm(h))). Over the
B x T tokens of the measured micro-batch (D = d_model, statistics in at least fp32):

    variance          mean over tokens of the per-token variance of y over the hidden dim:
                      (1/BT) sum_t (1/D) sum_d (y_td - mean_d y_t)^2      (biased; the Curse of Depth paper's
                      "output variance" of layer l, the quantity the next LayerNorm divides by)
    rms               sqrt(mean over all elements of y^2)
    attn_ratio        ||a||_F / ||alpha x||_F   (Frobenius norms over the micro-batch: the attention output
                      relative to the residual it is added to, Csordas et al.'s ||a_l|| / ||h_l||)
    mlp_ratio         ||m||_F / ||alpha h||_F   with h the input of mlp_norm, i.e. the residual m is added to
                      (= ||m_l|| / ||h_l + a_l|| in Csordas et al.'s notation for pre-norm blocks)
    angular_distance  mean over tokens of arccos(cos(x_t, y_t)) / pi, in [0, 1] (Gromov et al., "The
                      Unreasonable Ineffectiveness of the Deeper Layers")
    grad_norm         L2 norm of the gradient of block l's parameters; grad_norm_embedding, _final_norm,
                      _head likewise (null when the model has no such parameters: a tied head is part of
                      the embedding, ln_free/post_ln/deepnorm have no final norm); grad_norm_global over all
                      parameters, equal to the `grad_norm` the engine reports in metrics.jsonl

Which data
----------
`step` is the optimizer step as in metrics.jsonl: activations and gradients of step s are those of its own
forward/backward passes, i.e. of the weights before update s is applied (step 1 = the initial weights).
Activation statistics come from ONE micro-batch per measured step: the first micro-batch of data-parallel
rank 0. The data loader gives that rank the first micro_batch_size samples of the step's global batch, so
the statistics cover the same samples in every TP/PP/DP layout with the same micro_batch_size. (With
gradient accumulation the other micro-batches are not measured.) Gradient norms are those of the
accumulated, data-parallel-averaged gradient of the whole global batch: the gradient the optimizer update
uses, before clipping.

How (cost and parallelism)
--------------------------
* Activations: forward hooks on each block and its attn_out_norm, mlp_norm and mlp_out_norm (nn.Identity
  where a scheme has no norm, still a module call) are registered at the start of a measured step and each
  block's hooks remove themselves after its first forward, so unmeasured steps and later micro-batches run
  no hook at all. Statistics are reduced on the device to 5 scalars per block; one `.tolist()` per measured
  step moves them to the host. Hooks run only on ranks with tp_rank == 0 and dp_rank == 0.
* TP: after the row-parallel all-reduce the residual stream and both branch outputs are full (replicated) on
  every TP rank, so activation statistics need no TP reduction. Gradient sums of squares count TP-sharded
  weights (`tensor_model_parallel`) on every TP rank and replicated ones (norm gains) on TP rank 0 only, then
  are summed over the model-parallel (TP x PP) group -- the rule the engine's own global norm uses.
* PP: each stage measures its own blocks into a fixed-size vector (zeros elsewhere); one all-reduce over the
  model-parallel group of data-parallel rank 0 assembles all layers on global rank 0, which writes. A tied
  embedding is counted once: DeepSpeed marks the non-owning stage's copy `ds_pipe_replicated`.
* Gradient hook point: the engine's `_take_model_step` (instance attribute, wrapped once at set-up). Both the
  plain DeepSpeedEngine (inside `engine.step()` at the accumulation boundary) and the PipelineEngine (its
  OptimizerStep instruction, inside `train_batch`) call it exactly once per optimizer step, after the
  data-parallel and tied-weight gradient reductions and before clipping and the optimizer update. A
  `torch.optim` step pre-hook would do for ZeRO 0 only; at ZeRO 1-2 the client optimizer sees flattened
  partitions.
* ZeRO: every gradient is read with `deepspeed.utils.safe_get_full_grad`: p.grad at ZeRO 0, the partitioned
  fp32 gradient reassembled over the data-parallel group at ZeRO 1-2 (and the bf16 optimizer's fp32
  accumulation buffer with train.precision=bf16). Its all-reduces run on every rank of the step, so at ZeRO
  1-2 a measured step costs about one extra gradient all-reduce.
* train.compile: a compiled block ignores hooks added after compilation, so the measured forward of each
  block runs eagerly (its compiled version is restored by its own hook); the hooks themselves are excluded
  from compilation (torch.compiler.disable).
* The measured step's extra time is part of its step_time / tokens_per_s in metrics.jsonl.

layer_stats.jsonl
-----------------
One JSON object per measured step; arrays have one entry per block, index 0 = block 1:

    {"step": 100, "layers": 8, "norm_scheme": "lns",
     "variance": [...], "rms": [...], "attn_ratio": [...], "mlp_ratio": [...], "angular_distance": [...],
     "grad_norm": [...], "grad_norm_embedding": 0.41, "grad_norm_final_norm": 0.02, "grad_norm_head": 0.37,
     "grad_norm_global": 0.93}

A resumed run drops entries after the checkpoint's step (as metrics.jsonl does). Non-finite values are
written as NaN/Infinity (Python's json reads them).

TensorBoard (run.dir/tb): scalars layers/<stat>/lNN (NN = 01..L) for the five statistics and grad_norm,
layers/grad_norm_{embedding,final_norm,head,global}, and per measured step a histogram
layers/variance_vs_depth whose bucket l (x-axis: layer index 1..L) has height = variance of layer l (the
histogram tab then shows variance against depth over training). At the end of the run an image
layers/variance_vs_depth_image plots variance against depth for up to 8 measured steps.
"""

from __future__ import annotations

import json
import math
import os

import torch
from torch import nn

from pretrain import compat

STATS = ("variance", "rms", "attn_ratio", "mlp_ratio", "angular_distance")
FILE = "layer_stats.jsonl"
# Gradient groups after the L blocks.
EMBEDDING, FINAL_NORM, HEAD, OTHER = range(4)
GROUP_NAMES = ("embedding", "final_norm", "head")


def _wide(x: torch.Tensor) -> torch.Tensor:
    if isinstance(x, tuple):  # a pipeline block's (x, positions, doc_ids) of packed SFT rows (models/pipeline.py)
        x = x[0]
    return x.detach().to(torch.promote_types(x.dtype, torch.float32))


# ----------------------------------------------------------------------------------------------------------
# Model structure (plain Llama or DeepSpeed PipelineModule)


def local_blocks(model: nn.Module) -> dict[int, nn.Module]:
    """{0-based global block index: Block} for the blocks this rank holds."""
    from models.llama import Block

    if hasattr(model, "blocks") and isinstance(model.blocks, nn.ModuleList):  # Llama
        return dict(enumerate(model.blocks))
    # PipelineModule: layer i of [embedding, block 1..L, final norm, head] is the child named str(i).
    children = model.named_children()
    return {int(name) - 1: child for name, child in children if name.isdigit() and isinstance(child, Block)}


def parameter_groups(model: nn.Module, n_layers: int) -> list[tuple[nn.Parameter, int]]:
    """(parameter, group) for every parameter: group l < L is block l (0-based), then L + EMBEDDING, ..."""
    from models.pipeline import EmbeddingPipe, FinalNormPipe, HeadPipe

    group_of: dict[int, int] = {}
    for index, block in local_blocks(model).items():
        for p in block.parameters():
            group_of[id(p)] = index
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, EmbeddingPipe) or leaf == "tok_emb":
            group = EMBEDDING
        elif isinstance(module, FinalNormPipe) or leaf == "final_norm":
            group = FINAL_NORM
        elif isinstance(module, HeadPipe) or leaf == "head":
            group = HEAD
        else:
            continue
        for p in module.parameters():
            group_of.setdefault(id(p), n_layers + group)
    return [(p, group_of.get(id(p), n_layers + OTHER)) for p in model.parameters()]


# ----------------------------------------------------------------------------------------------------------
# Activation statistics (pure torch: usable on a bare model, no torch.distributed)


def _eager(fn):
    """A hook that runs eagerly and without autograd, also inside a torch.compile'd block (train.compile): dynamo
    graph-breaks around it instead of tracing its side effects (the compiled block is reused when no hook is set)."""
    return torch.compiler.disable(torch.no_grad()(fn), recursive=True)


class _BlockRecorder:
    """The hooks of one block; they measure its first forward after `arm()` and then remove themselves."""

    def __init__(self, index: int, block: nn.Module, out: dict[int, torch.Tensor]):
        self.index, self.block, self.out = index, block, out
        self.alpha = float(getattr(block, "residual_alpha", 1.0))
        self.handles: list = []
        self.compiled = None
        self.a2 = self.h2 = self.m2 = None

    def arm(self) -> None:
        self.disarm()
        self.a2 = self.h2 = self.m2 = None
        b = self.block
        self.handles = [
            b.attn_out_norm.register_forward_hook(self._attn_out),
            b.mlp_norm.register_forward_pre_hook(self._mlp_in),
            b.mlp_out_norm.register_forward_hook(self._mlp_out),
            b.register_forward_hook(self._block),
        ]
        # train.compile: a compiled block would not run hooks added after compilation, so the measured forward
        # of this block runs eagerly; the compiled version is back as soon as it is measured.
        self.compiled = compat.suspend_compiled(b)

    def disarm(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        compat.restore_compiled(self.block, self.compiled)
        self.compiled = None

    # Fused norms (torch.linalg.vector_norm) rather than x.square().sum() and friends: no [B, T, D]
    # temporaries where avoidable, which keeps a measured step within a few percent of an unmeasured one.
    @_eager
    def _attn_out(self, module, args, output):
        self.a2 = torch.linalg.vector_norm(_wide(output)).square()

    @_eager
    def _mlp_in(self, module, args):
        self.h2 = torch.linalg.vector_norm(_wide(args[0])).square()

    @_eager
    def _mlp_out(self, module, args, output):
        self.m2 = torch.linalg.vector_norm(_wide(output)).square()

    @_eager
    def _block(self, module, args, output):
        x, y = _wide(args[0]), _wide(output)
        alpha2 = self.alpha * self.alpha
        tiny = torch.finfo(y.dtype).tiny
        x_tok = torch.linalg.vector_norm(x, dim=-1)  # [B, T]
        y_tok = torch.linalg.vector_norm(y, dim=-1)
        # two-pass per-token variance (stable when the per-token mean is large)
        variance = torch.linalg.vector_norm(y - y.mean(dim=-1, keepdim=True), dim=-1).square().mean() / y.shape[-1]
        rms = (y_tok.square().sum() / y.numel()).sqrt()
        nan = torch.full((), math.nan, dtype=y.dtype, device=y.device)  # a sub-hook that did not run
        a2, h2, m2 = (nan if v is None else v for v in (self.a2, self.h2, self.m2))
        attn_ratio = (a2 / (alpha2 * x_tok.square().sum()).clamp_min(tiny)).sqrt()
        mlp_ratio = (m2 / (alpha2 * h2).clamp_min(tiny)).sqrt()
        cos = torch.linalg.vecdot(x, y) / (x_tok * y_tok).clamp_min(tiny)
        angular = torch.acos(cos.clamp(-1.0, 1.0)).mean() / math.pi
        self.out[self.index] = torch.stack([variance, rms, attn_ratio, mlp_ratio, angular])
        self.disarm()


class ActivationProbe:
    """Per-block activation statistics of the first forward of each block after `arm()`.

        probe = ActivationProbe(local_blocks(model), n_layers)
        probe.arm(); model(tokens); stats = probe.result()   # [len(STATS), n_layers], zeros for other blocks
    """

    def __init__(self, blocks: dict[int, nn.Module], n_layers: int):
        self.n_layers = n_layers
        self.measured: dict[int, torch.Tensor] = {}
        self.recorders = [_BlockRecorder(i, b, self.measured) for i, b in sorted(blocks.items())]

    def arm(self) -> None:
        self.measured.clear()
        for r in self.recorders:
            r.arm()

    def disarm(self) -> None:
        for r in self.recorders:
            r.disarm()

    def result(self, device=None, dtype=torch.float64) -> torch.Tensor:
        out = torch.zeros(len(STATS), self.n_layers, dtype=dtype, device=device)
        for index, stats in self.measured.items():
            out[:, index] = stats.to(device=out.device, dtype=dtype)
        return out


# ----------------------------------------------------------------------------------------------------------
# Gradient norms


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


# ----------------------------------------------------------------------------------------------------------
# Records and writers


def make_record(step: int, n_layers: int, norm_scheme: str, act: torch.Tensor, grad_sq: torch.Tensor,
                counts: torch.Tensor) -> dict:
    """The layer_stats.jsonl object from the reduced tensors (act [len(STATS), L], grad_sq/counts [L + 4])."""
    act_rows, sq, n = act.tolist(), grad_sq.tolist(), counts.tolist()
    record = {"step": step, "layers": n_layers, "norm_scheme": norm_scheme}
    record.update({name: row for name, row in zip(STATS, act_rows)})
    record["grad_norm"] = [math.sqrt(v) for v in sq[:n_layers]]
    for i, name in enumerate(GROUP_NAMES):
        record[f"grad_norm_{name}"] = math.sqrt(sq[n_layers + i]) if n[n_layers + i] > 0 else None
    record["grad_norm_global"] = math.sqrt(sum(sq))
    return record


class LayerStatsWriter:
    """layer_stats.jsonl and TensorBoard (rank 0 only)."""

    def __init__(self, run_dir: str, start_step: int, tb=None, say=None, figure=None):
        from pretrain.train.metrics import torn_line_message, truncate_jsonl

        self.path = os.path.join(run_dir, FILE)
        self.tb, self.figure = tb, figure
        self.history: list[dict] = []
        torn = truncate_jsonl(self.path, start_step)  # a torn last line (a write cut off) is dropped, and said
        if torn is not None:
            (say or self._say)(torn_line_message(self.path, torn))

    @staticmethod
    def _say(line: str) -> None:
        """A log line that does not break the progress bar (tqdm.write prints above an active bar)."""
        import sys

        from tqdm import tqdm

        tqdm.write(line, file=sys.stdout)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.history.append({"step": record["step"], "variance": record["variance"]})
        if self.tb is None:
            return
        step, n = record["step"], record["layers"]
        scalars = [(f"layers/{name}/l{l:02d}", v) for name in (*STATS, "grad_norm")
                   for l, v in enumerate(record[name], start=1)]
        scalars += [(f"layers/grad_norm_{name}", record[f"grad_norm_{name}"]) for name in (*GROUP_NAMES, "global")]
        compat.add_scalars(self.tb, [(tag, v) for tag, v in scalars if v is not None and math.isfinite(v)], step)
        variance = record["variance"]
        if all(math.isfinite(v) for v in variance):
            # A "histogram" whose bucket l spans (l - 1/2, l + 1/2] and holds layer l's variance: TensorBoard's
            # histogram tab draws variance against depth, one curve per measured step.
            self.tb.add_histogram_raw(
                "layers/variance_vs_depth", min=0.5, max=n + 0.5, num=n, sum=sum(variance),
                sum_squares=sum(v * v for v in variance), bucket_limits=[l + 0.5 for l in range(1, n + 1)],
                bucket_counts=variance, global_step=step,
            )

    def close(self) -> None:
        if self.tb is None or not self.history or self.figure is None:
            return
        picked = self.history if len(self.history) <= 8 else [
            self.history[round(i * (len(self.history) - 1) / 7)] for i in range(8)
        ]
        self.tb.add_figure("layers/variance_vs_depth_image", self.figure(picked), self.history[-1]["step"])


# ----------------------------------------------------------------------------------------------------------
# Training-loop integration


class NoDiagnostics:
    """diagnostics.interval = 0: nothing registered, nothing measured."""

    def begin_step(self, step: int) -> None:
        pass

    def end_step(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class LayerDiagnostics:
    """Measures every `interval`-th step: `begin_step(s)` before optimizer step s runs, `end_step(s)` after."""

    def __init__(self, cfg, built, topo, tb, start_step: int, figure=None):
        from megatron.core import parallel_state

        self.interval = cfg.diagnostics.interval
        self.n_layers = cfg.model.n_layers
        self.norm_scheme = cfg.model.norm_scheme
        self.device = topo.device
        self.tp_rank, self.dp_rank = topo.tp_rank, topo.dp_rank
        self.mp_group = parallel_state.get_model_parallel_group() if topo.tp * topo.pp > 1 else None
        self.probe = None
        if topo.tp_rank == 0 and topo.dp_rank == 0:
            self.probe = ActivationProbe(local_blocks(built.model), self.n_layers)
        self.entries = parameter_groups(built.model, self.n_layers)
        self.n_groups = self.n_layers + 4
        self.writer = LayerStatsWriter(cfg.run.dir, start_step, tb, figure=figure) if topo.rank == 0 else None
        self.measuring = False
        self.grads: tuple[torch.Tensor, torch.Tensor] | None = None
        self._wrap_model_step(built.engine)

    def _wrap_model_step(self, engine) -> None:
        def before_step():
            if self.measuring:
                self.grads = self.gradient_sums()

        compat.wrap_model_step(engine, before_step)

    def gradient_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        from deepspeed.utils import (
            safe_get_full_grad,  # p.grad at ZeRO 0; reassembled partitions at ZeRO 1-2
        )

        return grad_square_sums(self.entries, self.n_groups, self.tp_rank, safe_get_full_grad)

    def begin_step(self, step: int) -> None:
        self.measuring = step % self.interval == 0
        self.grads = None
        if self.measuring and self.probe is not None:
            self.probe.arm()

    def end_step(self, step: int) -> None:
        if not self.measuring:
            return
        self.measuring = False
        import torch.distributed as dist

        if self.probe is not None:
            self.probe.disarm()
        if self.dp_rank != 0:
            return  # data-parallel replicas took part in the ZeRO collectives; rank 0's group has the rest
        act = self.probe.result(self.device) if self.probe is not None else torch.zeros(
            len(STATS), self.n_layers, dtype=torch.float64, device=self.device)
        if self.grads is None:  # the optimizer step did not run (should not happen)
            nan = torch.full((self.n_groups,), float("nan"), dtype=torch.float64, device=self.device)
            grad_sq, counts = nan, torch.zeros_like(nan)
        else:
            grad_sq, counts = (t.to(self.device) for t in self.grads)
        packed = torch.cat([act.flatten(), grad_sq, counts])
        if self.mp_group is not None:
            dist.all_reduce(packed, group=self.mp_group)  # TP shards, PP stages (zeros where not held)
        if self.writer is None:
            return
        n_act = len(STATS) * self.n_layers
        record = make_record(
            step, self.n_layers, self.norm_scheme, packed[:n_act].view(len(STATS), self.n_layers),
            packed[n_act:n_act + self.n_groups], packed[n_act + self.n_groups:],
        )
        self.writer.write(record)

    def close(self) -> None:
        if self.probe is not None:
            self.probe.disarm()
        if self.writer is not None:
            self.writer.close()


def setup(cfg, built, topo, tb=None, start_step: int = 0):
    """The diagnostics of a training run: `NoDiagnostics()` when diagnostics.interval is 0."""
    if cfg.diagnostics.interval <= 0:
        return NoDiagnostics()
    return LayerDiagnostics(cfg, built, topo, tb, start_step)
