"""A training checkpoint as layout-independent full tensors, and that state loaded into an engine of any layout.

DeepSpeed refuses a ZeRO checkpoint at another data-parallel size and cannot move between ZeRO stages or
between pipelined and plain models. A resume on another layout (tp, pp, data-parallel size, zero_stage,
precision) therefore goes through this module instead of `engine.load_checkpoint`:

    state = read(folder)          # full (TP = 1, unpipelined) fp32 weights, Adam moments and step counters
    apply(built, cfg, state)      # each rank takes its shard: TP slice, its pipeline stage's layers, and under
                                  # ZeRO / bf16 its fragment of the flat fp32 partition

Every rank reads the files it needs memory-mapped. Weights come from the fp32 master copy where the optimizer
keeps one (ZeRO, bf16), so nothing is rounded. The same `apply_weights` starts a run from another run's weights
(`train.init_from`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models import Llama
from models.parallel import tp_splits
from models.pipeline import full_name_prefix
from pretrain import compat
from pretrain.config import ExperimentConfig
from pretrain.errors import UserError
from pretrain.state.checkpoint import PARAM_NAMES_FILE, load_model_state, read_param_names



@dataclass
class FullState:
    weights: dict[str, torch.Tensor]  # full Llama names -> full fp32 tensors
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    adam_step: int  # Adam's step count (applied updates: skipped steps do not count)
    scheduler_step: int  # lr scheduler position
    global_steps: int
    global_samples: int
    skipped_steps: int


def full_name(model_cfg, local: str, pipelined: bool) -> str:
    """A parameter's name in the full `Llama` from its name in the (pipelined) module that trained it."""
    if not pipelined:
        return local
    head, rest = local.split(".", 1)
    if head == "tied_modules":  # tied_modules.<key>.tok_emb.weight: the embedding, on the first and last stage
        return rest.split(".", 1)[1]
    return full_name_prefix(model_cfg, int(head)) + rest


# ----------------------------------------------------------------------------------------------------------
# What a save records besides DeepSpeed's files
# ----------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------


def read(folder: str, layout: dict, cfg: ExperimentConfig | None = None) -> FullState:
    """The whole training state of the checkpoint `folder`, saved on `layout` (checkpoint.read_layout); `cfg`: its
    stored config where the caller has read it already."""
    cfg, weights = load_model_state(folder, cfg)
    tp, pp = layout["tp"], layout["pp"]
    names = read_param_names(folder)
    per_tp: list[dict[str, compat.ParamState]] = [{} for _ in range(tp)]
    adam_step = None
    model_states = None
    for stage in range(pp):
        for tp_rank in range(tp):
            mp = stage * tp + tp_rank
            model_states = compat.load_file(compat.model_states_path(folder, mp))
            partitions = compat.optimizer_partition_paths(folder, mp)
            if partitions:
                states, step = compat.read_optimizer_partitions(partitions)
            else:
                if names is None:
                    raise UserError(
                        f"checkpoint {folder} was saved by an earlier normlab without {PARAM_NAMES_FILE}, so its ZeRO-0 "
                        f"optimizer state cannot be resharded; resume it on its own layout (tp={tp}, pp={pp}, "
                        f"dp={layout['dp']}, zero_stage={layout['zero_stage']})"
                    )
                states, step = compat.read_plain_optimizer(model_states, names[stage])
            adam_step = step if step is not None else adam_step
            for local, state in states.items():
                per_tp[tp_rank][full_name(cfg.model, local, pp > 1)] = state
    exp_avg, exp_avg_sq = {}, {}
    splits = tp_splits(Llama.meta(cfg.model, tp))
    for name, full in weights.items():
        shards = [per_tp[r].get(name) for r in range(tp)]
        if any(s is None for s in shards):
            continue  # never updated (every step so far skipped): Adam starts from zero moments
        split = splits.get(name)
        shape = _shard_shape(full.shape, split, tp)

        def merged(attr, shards=shards, split=split, shape=shape):
            pieces = [getattr(s, attr).view(shape) for s in shards]
            return split.merge(pieces) if split is not None else pieces[0]

        exp_avg[name], exp_avg_sq[name] = merged("exp_avg"), merged("exp_avg_sq")
        if shards[0].master is not None:
            weights[name] = merged("master")
    return FullState(
        weights=weights, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, adam_step=adam_step or 0,
        scheduler_step=compat.scheduler_position(model_states), global_steps=int(model_states["global_steps"]),
        global_samples=int(model_states["global_samples"]), skipped_steps=int(model_states["skipped_steps"]),
    )


def _shard_shape(full_shape, split, tp: int) -> tuple[int, ...]:
    shape = list(full_shape)
    if split is not None:
        shape[split.dim] //= tp
    return tuple(shape)


# ----------------------------------------------------------------------------------------------------------
# Loading into an engine
# ----------------------------------------------------------------------------------------------------------


def _local_params(built, model_cfg):
    for local, param in built.model.named_parameters():
        yield full_name(model_cfg, local, built.pipelined), param


def _shard(param: torch.nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    split = getattr(param, "tp_split", None)
    return split.shard(full) if split is not None else full


def apply(built, cfg, state: FullState) -> None:
    """Weights, Adam moments, steps and schedule position of `state` into this rank's part of `built`."""
    engine = built.engine
    missing = [n for n, _ in _local_params(built, cfg.model) if n not in state.weights]
    if missing:
        raise UserError(f"checkpoint: no weights for {', '.join(missing[:5])}; it does not belong to this model")
    for name, param in _local_params(built, cfg.model):
        weights = _shard(param, state.weights[name]).to(param.device)
        zeros = torch.zeros_like(weights, dtype=torch.float32)
        avg = _shard(param, state.exp_avg[name]).to(param.device) if name in state.exp_avg else zeros
        avg_sq = _shard(param, state.exp_avg_sq[name]).to(param.device) if name in state.exp_avg_sq else zeros
        compat.set_param_state(engine, param, weights, avg, avg_sq, state.adam_step)
    if compat.is_partitioned(engine):
        compat.relink_partitions(engine)
    compat.set_engine_counters(engine, state.global_steps, state.global_samples, state.skipped_steps)
    # Persistent buffers are model state too (the frozen sigmas of norm removal, pretrain/removal/).
    for local, buffer in built.model.named_buffers():
        name = full_name(cfg.model, local, built.pipelined)
        if name in state.weights:
            with torch.no_grad():
                buffer.copy_(state.weights[name].view_as(buffer))


def apply_weights(built, cfg, weights: dict[str, torch.Tensor]) -> None:
    """Only the weights (a fresh optimizer and schedule): `train.init_from`."""
    # DeepSpeed picks its accelerator at import: here only once pretrain.train has built an engine
    from deepspeed.utils import safe_set_full_fp32_param

    for name, param in _local_params(built, cfg.model):
        value = _shard(param, weights[name]).to(param.device)
        with torch.no_grad():
            param.data.copy_(value.view_as(param))
        safe_set_full_fp32_param(param, value)  # the fp32 master copy under ZeRO / bf16 (no-op otherwise)
