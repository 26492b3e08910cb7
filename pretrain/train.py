"""The training loop, top to bottom: set up, (resume), step, log, evaluate, checkpoint, stop.

Exit codes: 0 done; 2 bad input (`UserError`); 3 stopped after train.max_bad_steps consecutive non-finite
steps; 75 stopped on SIGTERM/SIGUSR1 after saving a checkpoint (requeue and resume with train.resume=auto).
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pretrain import checkpoint, full_state, resume
from pretrain.analysis import diagnostics
from pretrain.config import ExperimentConfig, load_config, save_config
from pretrain.distributed import Topology, init_distributed, placement, shutdown
from pretrain.engine import Built, apply_optimizer_settings, build_engine
from pretrain.errors import UserError
from pretrain.init_from import load_weights, resolve_model
from pretrain.evaluate import evaluate
from pretrain.metrics import MetricsWriter, log_line, peak_flops

EXIT_OK = 0
EXIT_UNSTABLE = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again" — the SLURM scripts requeue on it


class StopSignal:
    """Remembers SIGTERM/SIGUSR1 so the loop can finish its step, save and exit cleanly."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum

    def any_rank(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class TrainHooks:
    """Extension points of the loop; the defaults do nothing. `pretrain/remove_norms.py` drives its norm-removal
    schedule through them. `ctx` (a `TrainContext`) holds the engine, config, topology, metrics writer, validation
    batches and the step the run is at. Every rank calls every hook (they may run collectives)."""

    def on_start(self, ctx: "TrainContext") -> None:
        """After set-up (and any resume), before the first step of this process."""

    def before_step(self, step: int) -> None:
        """Before optimizer step `step` (1-based) runs."""

    def after_step(self, step: int) -> dict:
        """After step `step`, before it is logged or saved; returns extra metrics for its logged record."""
        return {}

    def on_finish(self, ctx: "TrainContext", exit_code: int) -> None:
        """After the last step of this process (ctx.step) and its checkpoint, before the writers close."""


@dataclass
class TrainContext:
    cfg: ExperimentConfig
    topo: Topology
    built: Built
    out: MetricsWriter
    val_batches: object  # pretrain.evaluate validation micro-batches of this rank, or None (eval.interval=0)
    data_fingerprint: str
    step: int


def default_hooks(cfg: ExperimentConfig) -> TrainHooks:
    """The hooks a config implies: a norm-removal run (model.removable_norms) drives its schedule."""
    if cfg.model.removable_norms:
        from pretrain.remove_norms import RemovalHooks

        return RemovalHooks(cfg)
    return TrainHooks()


def train(cfg: ExperimentConfig, hooks: TrainHooks | None = None) -> int:
    cfg = preflight(cfg)
    stop = StopSignal()  # from the start: a preemption signal during set-up must not kill the process
    topo = init_distributed(cfg.parallel.tp, cfg.parallel.pp)
    try:
        return _train(cfg, topo, stop, hooks)
    finally:
        shutdown()


def preflight(cfg: ExperimentConfig) -> ExperimentConfig:
    """What can be checked before any process starts: the resume target, the model keys taken from it or from
    train.init_from, and the config changes a resume refuses. Returns the resolved config."""
    check_resume_target(cfg)
    resume_from = checkpoint.resolve_resume(cfg.train.resume, os.path.join(cfg.run.dir, "checkpoints"))
    cfg = resolve_model(cfg, resume_from)
    if resume_from:
        old = load_config(os.path.join(resume_from, "config.yaml"), stored=True)
        layout = checkpoint.read_layout(resume_from, old)
        resume.plan_resume(old, cfg, checkpoint.read_state(resume_from), layout, layout, data_fingerprint=None)
    return cfg


def _train(cfg: ExperimentConfig, topo: Topology, stop: StopSignal, hooks: TrainHooks | None = None) -> int:
    from pretrain.data_setup import build_loaders

    rank0 = topo.rank == 0
    ckpt_root = os.path.join(cfg.run.dir, "checkpoints")
    resume_from = checkpoint.resolve_resume(cfg.train.resume, ckpt_root)
    saved = checkpoint.read_state(resume_from) if resume_from else {"step": 0, "consumed_samples": 0}
    step, consumed_samples = saved["step"], saved["consumed_samples"]
    # Everything that can reject the user's input (data, parallel layout) runs before the run folder is touched.
    train_iter, val_batches = build_loaders(cfg, topo, consumed_samples=consumed_samples)
    fingerprint = train_iter.state_dict()["fingerprint"]
    plan = None
    if resume_from:
        old = load_config(os.path.join(resume_from, "config.yaml"), stored=True)
        plan = resume.plan_resume(old, cfg, saved, checkpoint.read_layout(resume_from, old),
                                  checkpoint.layout_of(cfg, topo), fingerprint)
    torch.manual_seed(cfg.train.seed)
    built = build_engine(cfg, topo)
    if plan is not None and plan.same_layout:
        checkpoint.load(built.engine, resume_from, topo.rank)
        apply_optimizer_settings(built, cfg, built.engine.lr_scheduler.last_epoch)
    elif plan is not None:
        state = full_state.read(resume_from, plan.old_layout)
        full_state.apply(built, cfg, state)
        checkpoint.load_rng(resume_from, topo.rank)
        apply_optimizer_settings(built, cfg, state.scheduler_step)
        del state
    elif cfg.train.init_from:
        full_state.apply_weights(built, cfg, load_weights(cfg))
    if rank0:
        os.makedirs(cfg.run.dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.run.dir, "config.yaml"))

    out = MetricsWriter(cfg.run.dir, cfg.train.steps, step, cfg.logging.tensorboard, cfg.logging.progress_bar, rank0)
    layer_stats = diagnostics.setup(cfg, built, topo, out.tb, start_step=step)  # no-op when diagnostics.interval=0
    if rank0:
        for line in placement(topo):
            out.say(line)
        for line in plan.log_lines() if plan else []:
            out.say(line)
        n = sum(p.numel() for p in built.model.parameters())
        start = f"resuming from {resume_from}" if resume_from else (
            f"starting from the weights of {cfg.train.init_from}" if cfg.train.init_from else "fresh start")
        out.say(
            f"training {cfg.model.norm_scheme} ({cfg.model.preset or 'custom'}) on {topo.world_size} rank(s) "
            f"[tp={topo.tp} pp={topo.pp} dp={topo.dp}, grad accum {built.gas}], {n:,} parameters on rank 0, "
            f"{start}; "
            f"TensorBoard: tensorboard --logdir {os.path.join(cfg.run.dir, 'tb')}"
        )
    hooks = default_hooks(cfg) if hooks is None else hooks
    ctx = TrainContext(cfg, topo, built, out, val_batches, fingerprint, step)
    hooks.on_start(ctx)
    flops_per_token = _flops_per_token(cfg)
    peak = peak_flops(topo.device)
    bad_in_a_row, skipped_total = 0, saved.get("skipped_steps", 0)
    window_time, window_steps = 0.0, 0
    exit_code = EXIT_OK

    last_step = min(cfg.train.steps, cfg.train.stop_at_step or cfg.train.steps)
    if step >= last_step:
        out.say(f"nothing to do: the run is already at step {step} (train.steps={cfg.train.steps})")
    while step < last_step:
        lr = built.engine.get_lr()[0]  # the lr this step uses (the scheduler moves on inside the step)
        t0 = time.perf_counter()
        layer_stats.begin_step(step + 1)
        hooks.before_step(step + 1)
        loss = train_step(built, train_iter, topo)
        step += 1
        consumed_samples += cfg.train.global_batch_size
        layer_stats.end_step(step)  # layer_stats.jsonl on measured steps (pretrain/analysis/diagnostics.py)
        ctx.step, extra = step, hooks.after_step(step)
        step_time = time.perf_counter() - t0
        applied = built.engine.was_step_applied() and math.isfinite(loss)
        bad_in_a_row = 0 if applied else bad_in_a_row + 1
        skipped_total += 0 if applied else 1
        window_time, window_steps = window_time + step_time, window_steps + 1
        if not applied and rank0:
            out.say(f"step {step}: non-finite loss or gradient (loss={loss}); update skipped ({bad_in_a_row} in a row)")
        if step % cfg.logging.interval == 0 or step == last_step or not applied:
            tokens_per_s = window_steps * cfg.train.global_batch_size * cfg.data.seq_len / window_time
            record = {
                "step": step, "loss": loss, "lr": lr, "grad_norm": _grad_norm(built),
                "tokens_per_s": tokens_per_s, "consumed_tokens": consumed_samples * cfg.data.seq_len, "step_time": step_time,
                "skipped_steps": skipped_total, **extra,
            }
            if peak:
                record["mfu"] = tokens_per_s * flops_per_token / (peak * topo.world_size)
            out.write(record, "train")
            out.say(log_line(record, cfg.train.steps, (cfg.train.steps - step) * window_time / window_steps))
            window_time, window_steps = 0.0, 0
        if bad_in_a_row >= cfg.train.max_bad_steps:
            if rank0:
                out.say(
                    f"error: {bad_in_a_row} consecutive steps with a non-finite loss or gradient; stopping. "
                    "Lower train.lr, raise train.warmup_steps or check the data; resume from the last checkpoint"
                )
            exit_code = EXIT_UNSTABLE
            break
        out.advance(step, loss)
        if val_batches is not None and (step % cfg.eval.interval == 0 or step == cfg.train.steps):
            val_loss = evaluate(built, val_batches, topo)
            out.write({"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}, "val")
            out.say(f"step {step:>6} | val_loss {val_loss:.4f} | val_ppl {math.exp(min(val_loss, 50)):.2f}")
        preempted = stop.any_rank(topo.device)
        periodic = cfg.checkpoint.interval > 0 and step % cfg.checkpoint.interval == 0
        if periodic or preempted or step == last_step:
            trainer_state = {"consumed_samples": consumed_samples, "consumed_tokens": consumed_samples * cfg.data.seq_len,
                             "skipped_steps": skipped_total, "data_fingerprint": fingerprint}
            folder = checkpoint.save(built, cfg, ckpt_root, step, trainer_state, topo)
            out.say(f"step {step:>6} | saved {folder}")
        if preempted:
            out.say(f"stopping on signal after saving step {step}; resume with train.resume=auto (exit {EXIT_PREEMPTED})")
            exit_code = EXIT_PREEMPTED
            break
    hooks.on_finish(ctx, exit_code)
    layer_stats.close()
    out.close()
    return exit_code


def train_step(built: Built, train_iter, topo: Topology) -> float:
    """One optimizer step over the global batch; returns its mean loss (same value on every rank)."""
    engine = built.engine
    if getattr(train_iter, "token_weighted", False):  # SFT batches (pretrain/data/sft.py)
        return _token_weighted_step(built, train_iter, topo)
    if built.pipelined:
        return float(engine.train_batch(data_iter=train_iter))
    total = torch.zeros((), device=topo.device)
    for _ in range(built.gas):
        tokens, labels = next(train_iter)
        loss = engine(tokens.to(topo.device), labels.to(topo.device))
        engine.backward(loss)
        engine.step()
        total += loss.detach().float()
    return _mean_over_data_parallel(total / built.gas)


def _token_weighted_step(built: Built, train_iter, topo: Topology) -> float:
    """One step whose loss is (sum of the trained-token losses of the global batch) / N, N = trained tokens of the
    whole global batch (all micro-batches, all data-parallel ranks), counted before the step. DeepSpeed scales each
    micro-batch loss by 1/gas and averages gradients over the dp ranks, so each micro-batch hands it its loss sum
    times gas * dp / N. Returns that token-weighted mean loss (the same on every rank)."""
    from megatron.core import parallel_state

    engine = built.engine
    batches = [next(train_iter) for _ in range(built.gas)]
    group = parallel_state.get_data_parallel_group()
    count = torch.tensor([float(sum(b.trained_tokens() for b in batches))], dtype=torch.float64, device=topo.device)
    if dist.get_world_size(group) > 1:
        dist.all_reduce(count, group=group)
    n = max(float(count), 1.0)
    scale = built.gas * topo.dp / n
    if built.pipelined:  # PipelineLoss returns sum * scale; train_batch averages over micro-batches and dp: sum / n
        return float(engine.train_batch(data_iter=iter([b.pipeline(scale) for b in batches])))
    total = torch.zeros(1, dtype=torch.float64, device=topo.device)
    for b in batches:
        loss_sum = engine(b.tokens.to(topo.device), b.labels.to(topo.device), reduction="sum",
                          **b.model_kwargs(topo.device))
        engine.backward(loss_sum * scale)
        engine.step()
        total += loss_sum.detach().double()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(total, group=group)
    return float(total) / n


def _mean_over_data_parallel(x: torch.Tensor) -> float:
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(x, group=group)
        x = x / dist.get_world_size(group)
    return float(x)


def _grad_norm(built: Built) -> float:
    norm = built.engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def _flops_per_token(cfg: ExperimentConfig) -> float:
    from models import Llama

    with torch.device("meta"):
        return Llama(cfg.model).flops_per_token(cfg.data.seq_len)


def check_resume_target(cfg: ExperimentConfig) -> None:
    """Fail before any process starts when train.resume names a checkpoint that cannot be used."""
    if cfg.train.resume not in (None, "auto"):
        checkpoint.check_checkpoint(cfg.train.resume)
    if cfg.train.resume is None and os.path.isfile(os.path.join(cfg.run.dir, "checkpoints", "latest")):
        raise UserError(
            f"{cfg.run.dir} already holds checkpoints; pass train.resume=auto to continue it or choose another run.dir"
        )
