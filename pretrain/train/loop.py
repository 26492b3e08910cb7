"""The training loop, top to bottom: set up, (resume), step, log, evaluate, checkpoint, stop.

The loop knows no feature: diagnostics, norm removal, the preemption signal and anything later plug in as
`TrainHooks` (pretrain/train/hooks.py; pretrain/features.py picks them from the config).

Exit codes (pretrain/errors.py): 0 done; 2 bad input (`UserError`); 3 stopped after train.max_bad_steps consecutive
non-finite steps; 75 a hook asked to stop (SIGTERM/SIGUSR1) and the step was saved (requeue and resume with
train.resume=auto).
"""

from __future__ import annotations

import os
import time
from typing import Sequence

import torch

from models import Llama
from pretrain.config import ExperimentConfig, save_config
from pretrain.config.loading import scheme_defaults_line
from pretrain.errors import EXIT_OK, EXIT_PREEMPTED, EXIT_UNSTABLE
from pretrain.notice import when_slow
from pretrain.runs import CONFIG_FILE
from pretrain.state import checkpoint, reshard
from pretrain.state.resume import RunStart
from pretrain.state.sources import load_weights
from pretrain.train.data import build_loaders
from pretrain.train.distributed import Topology, init_distributed, placement, shutdown
from pretrain.train.engine import apply_optimizer_settings, build_engine, lr_lambda
from pretrain.train.evaluate import evaluate
from pretrain.train.hooks import TrainContext, TrainHooks
from pretrain.train.metrics import MetricsWriter, closing_summary, log_line, peak_flops
from pretrain.train.health import StepHealth
from pretrain.train.provenance import NonFiniteLocator
from pretrain.train.recompiles import CompileCount
from pretrain.train.spikes import SpikeResponse, Spikes
from pretrain.train.steps import train_step
from pretrain.train.syncs import StepSyncs
from pretrain.train.trackers import open_trackers


def train(start: RunStart, hooks: Sequence[TrainHooks] = ()) -> int:
    """A whole training process: the process group, one run (`run`), shutdown. `start` from
    `pretrain.state.resume.prepare_run`."""
    started = time.perf_counter()
    topo = init_distributed(start.cfg.parallel.tp, start.cfg.parallel.pp)
    try:
        code = run(start, topo, hooks)
    finally:
        shutdown()
    if code == EXIT_OK and topo.rank == 0:
        print("\n".join(closing_summary(start.cfg, time.perf_counter() - started)), flush=True)
    return code


def run(start: RunStart, topo: Topology, hooks: Sequence[TrainHooks] = ()) -> int:
    """One run in an initialised process group (`pretrain remove-norms` runs two in one)."""
    cfg = start.cfg
    rank0 = topo.rank == 0
    ckpt_root = os.path.join(cfg.run.dir, "checkpoints")
    step, consumed_samples = start.saved["step"], start.saved["consumed_samples"]
    # Everything that can reject the user's input (data, parallel layout) runs before the run folder is touched.
    with when_slow(f"opening the data {', '.join(map(str, cfg.data.paths))} (the first time: tokenizing it)", rank0):
        train_iter, val_batches = build_loaders(cfg, topo, consumed_samples=consumed_samples)
    fingerprint = train_iter.state_dict()["fingerprint"]
    plan = start.plan(checkpoint.layout_of(cfg, topo), fingerprint)
    torch.manual_seed(cfg.train.seed)
    with when_slow("building the model and the DeepSpeed engine", rank0):
        built = build_engine(cfg, topo)
    if plan is not None and plan.same_layout:
        with when_slow(f"loading {start.folder}", rank0):
            checkpoint.load(built.engine, start.folder, topo.rank)
        apply_optimizer_settings(built, cfg, built.engine.lr_scheduler.last_epoch)
    elif plan is not None:
        with when_slow(f"reading {start.folder} for another layout", rank0):
            state = reshard.read(start.folder, plan.old_layout, start.old_cfg)
        reshard.apply(built, cfg, state)
        checkpoint.load_rng(start.folder, topo.rank)
        apply_optimizer_settings(built, cfg, state.scheduler_step)
        del state
    elif cfg.train.init_from:
        reshard.apply_weights(built, cfg, load_weights(cfg))
    if rank0:
        os.makedirs(cfg.run.dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.run.dir, CONFIG_FILE))

    trackers = open_trackers(cfg, step) if rank0 else []  # logging.backends: TensorBoard, W&B, trackio
    out = MetricsWriter(cfg.run.dir, cfg.train.steps, step, trackers, cfg.logging.progress_bar, rank0)
    if rank0:
        for line in placement(topo):
            out.say(line)
        for line in plan.log_lines() if plan else []:
            out.say(line)
        if plan is not None:
            line = schedule_change(start.old_cfg, cfg, step, plan)
            if line:
                out.say(line)
        if built.loss_line:
            out.say(built.loss_line)
        line = scheme_defaults_line(cfg)
        if line and plan is None:  # a resumed run said it when it started
            out.say(line)
        n = sum(p.numel() for p in built.model.parameters())
        how = f"resuming from {start.folder}" if start.folder else (
            f"starting from the weights of {cfg.train.init_from}" if cfg.train.init_from else "fresh start")
        out.say(
            f"training {cfg.model.norm_scheme} ({cfg.model.preset or 'custom'}) on {topo.world_size} rank(s) "
            f"[tp={topo.tp} pp={topo.pp} dp={topo.dp}, grad accum {built.gas}], {n:,} parameters on rank 0, "
            f"{how}"
        )
        for tracker in trackers:
            out.say(tracker.line)
    ctx = TrainContext(cfg, topo, built, out, val_batches, fingerprint, step)
    for hook in hooks:
        hook.on_start(ctx)
    flops_per_token = _flops_per_token(cfg)
    peak = peak_flops(topo.device)
    skipped_total = start.saved.get("skipped_steps", 0)
    spikes = Spikes(cfg.train.spike_window, cfg.train.spike_threshold, topo.device)  # checked on the device
    health = StepHealth(topo.device, cfg.train.max_bad_steps, spikes)
    # train.on_spike: snapshots, rollbacks and the data positions skipped (by this run or the checkpoint's)
    response = SpikeResponse(cfg, built, topo, train_iter, spikes, start.saved.get("skipped_batches", []))
    response.at_record(step, consumed_samples, first=True)
    syncs = StepSyncs(cfg.logging.host_syncs)
    locator = NonFiniteLocator(built, topo, train_iter)  # where a bad step's first non-finite value came from
    compiles = CompileCount(cfg.train.compile)  # graphs compiled, and recompiled after the warm-up
    last_loss = float("nan")  # the progress bar shows the last logged loss: reading every step's would wait for the GPU
    window_start, window_steps = time.perf_counter(), 0
    exit_code = EXIT_OK

    last_step = min(cfg.train.steps, cfg.train.stop_at_step or cfg.train.steps)
    if step >= last_step:
        out.say(f"nothing to do: the run is already at step {step} (train.steps={cfg.train.steps})")
    while step < last_step:
        with syncs.step():  # counts this step's host synchronisations (logging.host_syncs)
            lr = built.engine.get_lr()[0]  # the lr this step uses (the scheduler moves on inside the step)
            for hook in hooks:
                hook.before_step(ctx, step + 1)
            consumed_samples = response.skip(consumed_samples)  # past the batches a rollback skipped
            locator.stepping(step + 1, consumed_samples)
            response.stepping(step + 1, consumed_samples)
            health.record(step + 1, train_step(built, train_iter, topo), built)
            step += 1
            compiles.stepped()
            window_steps += 1
            consumed_samples += cfg.train.global_batch_size
            ctx.step, extra = step, {}
            for hook in hooks:
                hook_start = time.perf_counter()
                extra.update(hook.after_step(ctx, step))
                if hook.evaluates_at(step):  # an evaluation, not training: out of step_time, as validation is
                    window_start += time.perf_counter() - hook_start
            evaluating = val_batches is not None and (step % cfg.eval.interval == 0 or step == cfg.train.steps)
            periodic = cfg.checkpoint.interval > 0 and step % cfg.checkpoint.interval == 0
            stop = [hook.stop_requested(ctx) for hook in hooks]  # every hook, every rank: they may be collectives
            saving = periodic or any(stop) or step == last_step
            if any(hook.writes_at(step) for hook in hooks):
                syncs.busy()
            if step % cfg.logging.interval == 0 or step == last_step or saving or evaluating:
                # The one read of the device since the last: the losses, skip flags and timing of the window.
                settled = health.settle(built.engine.get_global_grad_norm())
                window_time = time.perf_counter() - window_start
                skipped_total += len(settled.bad_steps)
                if settled.bad_steps and rank0:
                    out.say(f"{_steps(settled.bad_steps)}: non-finite loss or gradient (loss={settled.loss}); update "
                            f"skipped ({settled.in_a_row} in a row at step {step})")
                lines, events = locator.after_record(settled.bad_steps, step)  # every rank: the re-run is collective
                for line in lines:
                    out.say(line)
                for event in events:
                    out.write(event, "non_finite")
                for event in settled.spikes:
                    out.write(event, f"spike/{event['series']}")  # TensorBoard: spike/loss/value, ...
                    out.say(f"step {event['step']}: {event['series']} spike {event['value']:.4g} (running median "
                            f"{event['median']:.4g}, threshold {event['threshold']:.4g})")
                tokens_per_s = window_steps * cfg.train.global_batch_size * cfg.data.seq_len / window_time
                record = {
                    "step": step, "loss": settled.loss, "lr": lr, "grad_norm": settled.grad_norm,
                    "tokens_per_s": tokens_per_s, "consumed_tokens": consumed_samples * cfg.data.seq_len,
                    "step_time": window_time / window_steps, "skipped_steps": skipped_total,
                    **{k: v.item() if isinstance(v, torch.Tensor) else v for k, v in extra.items()},
                }
                if peak:
                    record["mfu"] = tokens_per_s * flops_per_token / (peak * topo.world_size)
                record.update(syncs.logged())
                record.update(compiles.logged())
                out.write(record, "train")
                out.say(log_line(record, cfg.train.steps, (cfg.train.steps - step) * window_time / window_steps))
                last_loss, window_start, window_steps = settled.loss, time.perf_counter(), 0
                if settled.stop_at is not None:
                    if rank0:
                        out.say(
                            f"error: {cfg.train.max_bad_steps} consecutive steps with a non-finite loss or gradient "
                            f"(at step {settled.stop_at}); stopping. Lower train.lr, raise train.warmup_steps or check "
                            "the data; resume from the last checkpoint"
                        )
                    exit_code = EXIT_UNSTABLE
                    break
                rewind = response.respond(settled.spike_steps, step)  # train.on_spike
                if isinstance(rewind, str):
                    out.say(f"error: {rewind}")
                    exit_code = EXIT_UNSTABLE
                    break
                if rewind is not None:
                    out.say(rewind.line)
                    out.write(rewind.event, "rollback")
                    step, consumed_samples = rewind.step, rewind.consumed_samples
                    ctx.step, window_start = step, time.perf_counter()
                    continue
                if settled.spikes and cfg.train.on_spike != "log":
                    out.say(f"spike at step {settled.spike_steps[0]}: no snapshot or checkpoint to roll back to yet; "
                            "training on")
                response.at_record(step, consumed_samples)  # a snapshot, when one is due
            out.advance(step, last_loss)
            if evaluating:
                val = evaluate(built, val_batches, topo)
                out.write(val.record(step), "val")
                out.say(val.line(step))
            if saving:
                trainer_state = {"consumed_samples": consumed_samples, "consumed_tokens": consumed_samples * cfg.data.seq_len,
                                 "skipped_steps": skipped_total, "data_fingerprint": fingerprint,
                                 **response.trainer_state()}
                folder = checkpoint.save(built, cfg, ckpt_root, step, trainer_state, topo)
                out.say(f"step {step:>6} | saved {folder}")
            if any(stop):
                out.say(f"stopping on signal after saving step {step}; resume with train.resume=auto (exit {EXIT_PREEMPTED})")
                exit_code = EXIT_PREEMPTED
                break
    line = compiles.closing_line()
    if line:
        out.say(line)
    for hook in hooks:
        hook.on_finish(ctx, exit_code)
    out.close()
    return exit_code


SCHEDULE_KEYS = ("train.lr", "train.steps", "train.warmup_steps", "train.min_lr_ratio")


def schedule_change(old: ExperimentConfig, new: ExperimentConfig, step: int, plan) -> str | None:
    """The resume line for a changed learning-rate schedule: the lr the next step takes under the checkpoint's
    schedule and under this run's (a longer train.steps stretches the cosine, so the lr jumps at the resumed step)."""
    keys = [k for k, *_ in plan.changes if k in SCHEDULE_KEYS]
    if not keys:
        return None
    before, after = (c.train.lr * lr_lambda(c)(step) for c in (old, new))
    return (f"resume: lr at step {step + 1} {before:.3e} -> {after:.3e} (the schedule of the new "
            f"{', '.join(keys)}, from where the run is)")


def _steps(steps: list[int]) -> str:
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {', '.join(map(str, steps))}"


def _flops_per_token(cfg: ExperimentConfig) -> float:
    return Llama.meta(cfg.model).flops_per_token(cfg.data.seq_len)
