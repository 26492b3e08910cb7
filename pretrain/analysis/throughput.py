"""Training throughput of a model preset through the real engine, for `pretrain bench` (pretrain/cli/bench.py):
random-token micro-batches, timed optimizer steps after a warm-up, and one profiled step summarized (top kernels and
operators, host synchronisations, peak memory).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import statistics
import time
import warnings

import torch

from pretrain.data.batches import LMBatch
from pretrain.files import atomic_write, atomic_writer

WARMUP_STEPS = 3  # compile, allocator growth and cuBLAS heuristics settle in these; never timed
PROFILE_RANGE = "bench::train_step"  # the record_function range around the profiled step
TOP_ROWS = 25

# CUDA runtime calls that block the host until the device has caught up, as CUPTI names them in the trace; a
# plain `cudaMemcpy` (not ...Async) is synchronous too. `.item()` / `float(t)` / a blocking `.cpu()` of a CUDA
# tensor is a device-to-host copy followed by cudaStreamSynchronize.
BLOCKING_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
# Where they come from, counted alongside: the scalar reads on the host side, and the copies on the device side.
SCALAR_READS = ("aten::item", "aten::_local_scalar_dense")
DTOH_COPY = "Memcpy DtoH"  # device events "Memcpy DtoH (Device -> Pageable)" / "(Device -> Pinned)"




class RandomTokens:
    """Endless pretraining micro-batches of uniform random tokens (pretrain/data/batches.py protocol)."""

    token_weighted = False

    def __init__(self, vocab_size: int, micro_batch_size: int, seq_len: int):
        self.shape, self.vocab_size = (micro_batch_size, seq_len + 1), vocab_size
        self.gen = torch.Generator().manual_seed(0)

    def __iter__(self):
        return self

    def __next__(self) -> LMBatch:
        tokens = torch.randint(0, self.vocab_size, self.shape, generator=self.gen)
        return LMBatch(tokens[:, :-1], tokens[:, 1:])


def bench_preset(cfg, topo, steps: int, profile_dir: str | None = None) -> dict:
    # DeepSpeed and megatron-core load here, for the command that trains
    from pretrain.diagnostics.hooks import LayerStatsHooks
    from pretrain.train.engine import build_engine
    from pretrain.train.hooks import TrainContext
    from pretrain.train.metrics import MetricsWriter, peak_flops
    from pretrain.train.steps import train_step
    from pretrain.train.syncs import HostSyncs

    built = build_engine(cfg, topo)
    t = cfg.train
    it = RandomTokens(cfg.model.vocab_size, t.micro_batch_size, cfg.data.seq_len)
    hooks = [LayerStatsHooks()] if cfg.diagnostics.interval > 0 else []  # --diagnostics-interval
    ctx = TrainContext(cfg, topo, built, MetricsWriter(cfg.run.dir, steps, 0, (), False, enabled=False), None, "", 0)
    for hook in hooks:
        hook.on_start(ctx)
    step = 0

    def one_step():
        nonlocal step
        step += 1
        for hook in hooks:
            hook.before_step(ctx, step)
        train_step(built, it, topo)
        ctx.step = step
        for hook in hooks:
            hook.after_step(ctx, step)

    if topo.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(WARMUP_STEPS):
        one_step()
    if profile_dir is not None:
        profile_step(one_step, topo.device, profile_dir, {
            "preset": cfg.model.preset, "micro": t.micro_batch_size, "seq_len": cfg.data.seq_len,
            "precision": t.precision, "compile": t.compile, "step": step + 1})
    first_timed = step + 1
    times = []
    for _ in range(steps):
        _sync(topo.device)
        t0 = time.perf_counter()
        one_step()
        _sync(topo.device)
        times.append(time.perf_counter() - t0)
    with HostSyncs(keep=100) as syncs:  # after the timed steps: the counting mode costs a Python call per op
        one_step()
    _sync(topo.device)
    step_s = statistics.median(times)
    tokens_per_s = t.global_batch_size * cfg.data.seq_len / step_s
    flops = built.model.flops_per_token(cfg.data.seq_len) * tokens_per_s
    peak = peak_flops(topo.device)
    mem = torch.cuda.max_memory_allocated() / 2**30 if topo.device.type == "cuda" else 0.0
    for hook in hooks:
        hook.on_finish(ctx, 0)
    shutil.rmtree(cfg.run.dir, ignore_errors=True)
    del built
    # step_ms is the median (what the table prints); the mean and every step's time are for --json, where a cost
    # paid every N steps (diagnostics at interval N) shows only in them. first_timed_step numbers the first entry
    # of step_times_ms as the optimizer step it was (the diagnostics measure the steps divisible by the interval).
    return {"preset": cfg.model.preset, "micro": t.micro_batch_size, "step_ms": 1000 * step_s,
            "tokens_per_s": tokens_per_s, "tflops": flops / 1e12, "mfu": flops / peak if peak else None, "mem_gib": mem,
            "mean_step_ms": 1000 * statistics.fmean(times), "step_times_ms": [1000 * x for x in times],
            "first_timed_step": first_timed, "steps": steps, "host_syncs": syncs.count,
            "host_sync_sites": sorted(set(syncs.sites))}


def profile_step(one_step, device: torch.device, out_dir: str, about: dict) -> dict:
    """Trace one call of `one_step` (CPU activity, and CUDA kernels and runtime calls on a GPU); write the table,
    the summary and the trace into `out_dir`, return the summary."""
    from torch.profiler import ProfilerActivity, profile, record_function  # the profiler: only for --profile

    warnings.filterwarnings("ignore", message=".*Profiler clears events.*")  # one trace, read once: not our case
    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    _sync(device)
    with profile(activities=activities) as prof:
        with record_function(PROFILE_RANGE):
            one_step()
        _sync(device)  # outside the range, inside the trace: every kernel of the step is in it, this wait is not
    sort_by = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    averages = prof.key_averages()
    atomic_write(os.path.join(out_dir, "profile.txt"), averages.table(sort_by=sort_by, row_limit=TOP_ROWS) + "\n")
    summary = {**about, "device": torch.cuda.get_device_name(device) if on_cuda else "CPU",
               **summarize_profile(prof.events(), averages, on_cuda)}
    summary["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if on_cuda else None
    write_json(os.path.join(out_dir, "profile.json"), summary)
    raw = os.path.join(out_dir, "trace.json")
    prof.export_chrome_trace(raw)
    # a 1b step's trace is ~10x smaller gzipped; `filename` names the trace in the gzip header, not the temp file
    with (open(raw, "rb") as src, atomic_writer(raw + ".gz") as f,
          gzip.GzipFile(filename=raw + ".gz", mode="wb", fileobj=f) as dst):
        shutil.copyfileobj(src, dst)
    os.remove(raw)
    return summary


def summarize_profile(events, averages, on_cuda: bool) -> dict:
    """The figures of profile.json from torch.profiler's events (FunctionEvent-like: name, device_type,
    time_range, self_device_time_total) and key averages of the trace around PROFILE_RANGE.

    Host-side events count only inside PROFILE_RANGE (the trace also holds the synchronize that closes it);
    device events (kernels, copies) are all the step's: nothing else ran on the device while tracing.
    """
    from torch.autograd import DeviceType  # the profiler's types: only for --profile

    step = next((e for e in events if e.name == PROFILE_RANGE), None)
    if step is None:
        raise RuntimeError(f"the profile has no {PROFILE_RANGE} range; torch.profiler dropped it")
    lo, hi = step.time_range.start, step.time_range.end
    host = [e for e in events if e.device_type == DeviceType.CPU and lo <= e.time_range.start <= hi]
    device = [e for e in events if e.device_type != DeviceType.CPU]
    counts = {name: sum(e.name == name for e in host) for name in BLOCKING_CALLS + SCALAR_READS}
    counts[DTOH_COPY] = sum(e.name.startswith(DTOH_COPY) for e in device)
    kernels: dict[str, list[float]] = {}
    for e in device:
        entry = kernels.setdefault(e.name, [0, 0.0])
        entry[0] += 1
        entry[1] += e.self_device_time_total
    top_kernels = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:TOP_ROWS]
    time_key = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    top_ops = sorted((a for a in averages if a.device_type == DeviceType.CPU and a.key != PROFILE_RANGE),
                     key=lambda a: -getattr(a, time_key))[:TOP_ROWS]
    return {
        "step_wall_ms": (hi - lo) / 1000,  # with the profiler's own overhead on the host
        "device_busy_ms": sum(v[1] for v in kernels.values()) / 1000 if on_cuda else None,
        "host_syncs": sum(counts[name] for name in BLOCKING_CALLS),
        "host_syncs_note": None if on_cuda else (
            "0 on CPU: there is no device for the host to wait for; the scalar reads (aten::item, "
            "aten::_local_scalar_dense) are where a GPU run synchronises"),
        "sync_events": counts,
        "top_kernels": [{"name": name, "calls": n, "device_ms": us / 1000} for name, (n, us) in top_kernels],
        "top_ops": [{"name": a.key, "calls": a.count, "self_device_ms": a.self_device_time_total / 1000,
                     "device_total_ms": a.device_time_total / 1000, "self_cpu_ms": a.self_cpu_time_total / 1000,
                     "cpu_total_ms": a.cpu_time_total / 1000} for a in top_ops],
    }


def write_json(path: str, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1))  # a reader (or a kill mid-write) never sees half a file


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
