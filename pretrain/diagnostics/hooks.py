"""Per-layer diagnostics as loop hooks: measure every diagnostics.interval-th step (pretrain/diagnostics/)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from models.norms import measured_streams
from pretrain import compat
from pretrain.diagnostics.probes import N_EXTRA_GROUPS, ActivationProbe, grad_square_sums, local_blocks, parameter_groups
from pretrain.diagnostics.stats import ACTIVATION_STATS, STREAM_ROWS
from pretrain.diagnostics.writer import LayerStatsWriter, make_record
from pretrain.train.distributed import parallel_state
from pretrain.train.hooks import TrainContext, TrainHooks
from pretrain.train.spikes import HostSpikes

# after pretrain.train, which sets DeepSpeed's accelerator before DeepSpeed is first imported
from deepspeed.utils import safe_get_full_grad  # p.grad at ZeRO 0; reassembled partitions at ZeRO 1-2  # noqa: E402


class LayerStatsHooks(TrainHooks):
    """Measures every diagnostics.interval-th step into layer_stats.jsonl and the trackers' layers/*: the activation
    statistics of the step's first micro-batch on data-parallel rank 0 (before step s), the gradient norms of the
    whole global batch (inside the optimizer step, before clipping), written after the step.

    `figure(history)` draws variance against depth for TensorBoard's end-of-run image (pretrain/features.py hands
    in pretrain.analysis.figures.variance_vs_depth_figure, so no plotting library is imported here)."""

    def __init__(self, figure: Callable | None = None):
        self.figure = figure
        self.measuring = False
        self.grads: tuple[torch.Tensor, torch.Tensor] | None = None

    def on_start(self, ctx: TrainContext) -> None:
        cfg, topo, built = ctx.cfg, ctx.topo, ctx.built
        self.interval, self.n_layers, self.norm_scheme = cfg.diagnostics.interval, cfg.model.n_layers, cfg.model.norm_scheme
        self.device, self.tp_rank, self.dp_rank = topo.device, topo.tp_rank, topo.dp_rank
        self.mp_group = parallel_state.get_model_parallel_group() if topo.tp * topo.pp > 1 else None
        self.n_streams = measured_streams(cfg.model)  # the per-stream statistics only with n > 1 side-by-side streams
        self.probe = None
        if topo.tp_rank == 0 and topo.dp_rank == 0:
            # grad_norm_stream: DeepSpeed divides each micro-batch's loss by the micro-batches per step (built.gas)
            self.probe = ActivationProbe(local_blocks(built.model), self.n_layers, self.n_streams, built.gas)
        self.entries = parameter_groups(built.model, self.n_layers)
        self.n_groups = self.n_layers + N_EXTRA_GROUPS
        self.spikes = HostSpikes(cfg.train.spike_window, cfg.train.spike_threshold)  # per-layer gradient norms
        self.writer = LayerStatsWriter(cfg.run.dir, ctx.step, ctx.out.trackers, tb=ctx.out.tb,
                                       figure=self.figure) if topo.rank == 0 else None
        compat.wrap_model_step(built.engine, self._before_model_step)

    def _before_model_step(self) -> None:
        """Inside the optimizer step, after the gradient reductions, before clipping (pretrain/compat.py)."""
        if self.measuring:
            self.grads = grad_square_sums(self.entries, self.n_groups, self.tp_rank, safe_get_full_grad)

    def writes_at(self, step: int) -> bool:
        return step % self.interval == 0

    def before_step(self, ctx: TrainContext, step: int) -> None:
        self.measuring = self.writes_at(step)
        self.grads = None
        if self.measuring and self.probe is not None:
            self.probe.arm()

    def after_step(self, ctx: TrainContext, step: int) -> dict:
        if not self.measuring:
            return {}
        self.measuring = False
        if self.probe is not None:
            self.probe.disarm()
        if self.dp_rank != 0:
            return {}  # data-parallel replicas took part in the ZeRO collectives; rank 0's group has the rest
        n_stats = len(ACTIVATION_STATS)
        act = self.probe.result(self.device) if self.probe is not None else torch.zeros(
            n_stats, self.n_layers, dtype=torch.float64, device=self.device)
        if self.grads is None:  # the optimizer step did not run (should not happen)
            nan = torch.full((self.n_groups,), float("nan"), dtype=torch.float64, device=self.device)
            grad_sq, counts = nan, torch.zeros_like(nan)
        else:
            grad_sq, counts = (t.to(self.device) for t in self.grads)
        streams = []
        if self.n_streams > 1:
            streams = [self.probe.stream_result(self.device) if self.probe is not None else torch.zeros(
                len(STREAM_ROWS), self.n_layers, self.n_streams, dtype=torch.float64, device=self.device)]
        packed = torch.cat([act.flatten(), grad_sq, counts, *(s.flatten() for s in streams)])
        if self.mp_group is not None:
            dist.all_reduce(packed, group=self.mp_group)  # TP shards, PP stages (zeros where not held)
        if self.writer is not None:
            n_act, end = n_stats * self.n_layers, n_stats * self.n_layers + 2 * self.n_groups
            record = make_record(
                step, self.n_layers, self.norm_scheme, packed[:n_act].view(n_stats, self.n_layers),
                packed[n_act:n_act + self.n_groups], packed[n_act + self.n_groups:end],
                packed[end:].view(len(STREAM_ROWS), self.n_layers, self.n_streams) if streams else None,
            )
            self.writer.write(record)
            norms = {f"grad_norm/l{i:02d}": v for i, v in enumerate(record["grad_norm"], 1)}
            for event in self.spikes.check(step, norms):  # per-layer gradient-norm spikes: logged only
                ctx.out.write(event, f"spike/{event['series']}")
                ctx.out.say(f"step {step}: {event['series']} spike {event['value']:.4g} (running median "
                            f"{event['median']:.4g}, threshold {event['threshold']:.4g})")
        return {}

    def on_finish(self, ctx: TrainContext, exit_code: int) -> None:
        if self.probe is not None:
            self.probe.disarm()
        if self.writer is not None:
            self.writer.close()
