"""Downstream tasks in the training loop (eval.downstream): `DownstreamHooks` scores them at the steps
`EvalConfig.downstream_at` names, on every layout, and writes a `down` record to metrics.jsonl and the trackers.

The questions are `pretrain eval-downstream`'s (lm-eval format, 0-shot, `eval.downstream_limit` of them per task by
its seeded subset), tokenized once by the training data's tokenizer, split into (context, continuation) rows by its
rule and scored by `choice_metrics` (pretrain/analysis/choices.py), so a record equals eval-downstream on the
checkpoint of that step (tests/pretrain/analysis/test_downstream_loop.py).

A row's log-likelihood is minus the loss sum of one forward whose labels are the continuation's tokens at their
positions and ignored elsewhere: the model's own loss, so vocab-parallel logits under TP (models/parallel.py
`cross_entropy`) and the fused chunked loss need no gathering. One row per forward: a loss sum over a batch would mix
its rows, and the pipeline engine's `eval_batch` returns one number per call.

* Plain engines (one process, TP, DP, ZeRO): the rows are dealt out over the data-parallel ranks by index
  (rows[rank::dp]), each rank's list padded to the same length with an all-ignored row (loss 0; ZeRO-3 gathers
  parameters in every forward, so every rank runs as many), and the sums all-gathered back into order.
* Pipeline: `eval_batch` averages its result over the data-parallel ranks, so every rank scores every row (dp times
  the work of a split) as a one-row micro-batch `batch.pipeline(scale=1.0)` (pipeline_loss: the micro-batch's loss
  sum). The rows' length differs from training's, so the engine's cached activation shapes are reset before each row
  and after the evaluation (DeepSpeed's `reset_activation_shape`). R rows cost R pipeline calls: fine for the few
  hundred rows of a small limit, slow for whole validation sets.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from pretrain import compat
from pretrain.analysis.choices import OLMO_METRICS, Prepared, choice_metrics, prepare
from pretrain.analysis.downstream_record import METRICS
from pretrain.data.batches import LMBatch
from pretrain.data.downstream_data import data_root
from pretrain.data.downstream_tasks import DownstreamTask, load_task
from pretrain.data.resolve import training_tokenizer
from pretrain.train.distributed import parallel_state  # megatron-core's, without its package init (pretrain/compat.py)
from pretrain.train.hooks import TrainContext, TrainHooks
from models.parallel import IGNORE_INDEX

def rows_of(prepared: list[Prepared], max_len: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, labels) per (context, continuation) pair of every question, in order: the model reads
    (context + continuation)[:-1], its last max_len tokens (as `choices.loglikelihoods`), and only the continuation's
    tokens are labels."""
    rows = []
    for p in prepared:
        for ctx, cont in p.pairs:
            seq = (ctx + cont)[-(max_len + 1):]
            inputs, targets = seq[:-1], seq[1:]
            n = min(len(cont), len(targets))
            rows.append((inputs, [IGNORE_INDEX] * (len(targets) - n) + targets[len(targets) - n:]))
    return rows


class DownstreamHooks(TrainHooks):
    """eval.downstream: the questions read and tokenized once at the start (the data fetched by rank 0 first), scored
    after the steps `EvalConfig.downstream_at` names; the time is left out of step_time (`evaluates_at`)."""

    def __init__(self, cfg):
        self.names = list(cfg.eval.downstream)
        self.limit = cfg.eval.downstream_limit
        self.eval_cfg, self.steps = cfg.eval, cfg.train.steps
        self.tasks: list[DownstreamTask] = []
        self.prepared: list[list[Prepared]] = []

    def on_start(self, ctx: TrainContext) -> None:
        if ctx.topo.rank == 0:
            root = data_root()  # fetched once into the cache, by one rank
        if dist.is_initialized():
            dist.barrier()
        if ctx.topo.rank != 0:
            root = data_root()
        tok = training_tokenizer(ctx.cfg, ctx.cfg.run.dir)
        self.tasks = [load_task(root, n, "lm-eval", 0, self.limit) for n in self.names]
        self.prepared = [prepare(tok, t.questions) for t in self.tasks]
        self.max_len = ctx.cfg.model.max_seq_len

    def writes_at(self, step: int) -> bool:
        return self.eval_cfg.downstream_at(step, self.steps)

    def evaluates_at(self, step: int) -> bool:
        return self.writes_at(step)

    def after_step(self, ctx: TrainContext, step: int) -> dict:
        if not self.writes_at(step):
            return {}
        started = time.perf_counter()
        record = {"step": step}
        for task, prep in zip(self.tasks, self.prepared):
            sums = row_loss_sums(ctx, rows_of(prep, self.max_len))
            lls, k = [], 0
            for p in prep:
                lls.append([-s for s in sums[k:k + len(p.pairs)]])
                k += len(p.pairs)
            m = choice_metrics(prep, lls)
            m["primary"] = m[OLMO_METRICS[task.primary_metric]]
            m["gold_ll"] = sum(ll[p.gold] for p, ll in zip(prep, lls)) / len(prep)
            for name in METRICS:
                record[f"down_{task.name}_{name}"] = m[name]
        for name in METRICS:
            record[f"down_avg_{name}"] = sum(record[f"down_{t.name}_{name}"] for t in self.tasks) / len(self.tasks)
        record["down_primary_metric"] = {t.name: t.primary_metric for t in self.tasks}  # OLMo's names (the report)
        record["down_limit"] = self.limit
        record["down_items"] = sum(len(p) for p in self.prepared)
        record["down_time"] = time.perf_counter() - started
        ctx.out.write(record, "down")
        ctx.out.say(f"step {step:>6} | downstream " + " ".join(
            f"{t.name} {record[f'down_{t.name}_primary']:.3f}" for t in self.tasks)
            + f" | avg {record['down_avg_primary']:.3f} ({record['down_time']:.1f} s)")
        return {}


@torch.no_grad()
def row_loss_sums(ctx: TrainContext, rows: list[tuple[list[int], list[int]]]) -> list[float]:
    """Each row's loss sum (minus its continuation's log-likelihood), the same on every rank (module docstring).
    Leaves the engine in training mode."""
    built, topo = ctx.built, ctx.topo
    built.engine.eval()
    try:
        with compat.eager_modules(built.model):
            return _pipeline_sums(built, rows) if built.pipelined else _plain_sums(built, rows, topo)
    finally:
        built.engine.train()


def _tensor(values: list[int]) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.long)


def _pipeline_sums(built, rows) -> list[float]:
    engine, out = built.engine, []
    try:
        for inputs, labels in rows:
            engine.reset_activation_shape()  # this row's length, not the training batches'
            batch = LMBatch(_tensor(inputs), _tensor(labels))
            out.append(float(engine.eval_batch(data_iter=iter([batch.pipeline(scale=1.0)]), num_micro_batches=1)))
    finally:
        engine.reset_activation_shape()  # training's shapes are sent again at the next step
    return out


def _plain_sums(built, rows, topo) -> list[float]:
    group = parallel_state.get_data_parallel_group() if dist.is_initialized() else None
    dp = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    per_rank = -(-len(rows) // dp)
    mine = rows[rank::dp]
    mine += [([0], [IGNORE_INDEX])] * (per_rank - len(mine))  # an all-ignored row: loss 0
    sums = torch.zeros(per_rank, dtype=torch.float64, device=topo.device)
    for i, (inputs, labels) in enumerate(mine):
        sums[i] = built.engine(_tensor(inputs).to(topo.device), _tensor(labels).to(topo.device),
                               reduction="sum").double()
    if dp > 1:
        gathered = [torch.empty_like(sums) for _ in range(dp)]
        dist.all_gather(gathered, sums, group=group)
    else:
        gathered = [sums]
    host = [g.tolist() for g in gathered]  # rank r's i-th sum is row i * dp + r
    return [host[k % dp][k // dp] for k in range(len(rows))]
