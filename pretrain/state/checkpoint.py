"""Checkpoints: DeepSpeed's own files plus what makes a resume exact, and an atomic `latest`.

    run.dir/checkpoints/
      step_00000100/            DeepSpeed tag folder (model, optimizer and scheduler states per rank)
        rng/rank_00000.pt       torch RNG states of each rank
        config.yaml             the resolved experiment config (export-hf / analyze-depth read it)
        param_names.json        each pipeline stage's parameter names in optimizer order (for resharding)
        trainer_state.json      step, consumed samples/tokens, data fingerprint, the layout (tp, pp, dp,
                                zero_stage, precision, world size); written last: its presence marks a complete save
      latest                    the tag of the newest complete checkpoint, replaced atomically

`latest` is written by rank 0 only after a barrier that every rank reaches once its files are on disk,
so a crash or kill -9 during a save leaves the previous checkpoint as `latest`; such a partial folder is
removed by the next successful save. Old checkpoints beyond `checkpoint.keep` are pruned only after
`latest` points to the new one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

from models import Llama
from models.parallel import merge_state_dicts
from models.pipeline import full_name_prefix
from pretrain import compat
from pretrain.config import ExperimentConfig, save_config
from pretrain.errors import UserError
from pretrain.files import atomic_write, atomic_writer
from pretrain.runs import CONFIG_FILE, read_stored_config
from pretrain.runs import find_checkpoint  # noqa: F401  (re-exported: callers name it with the checkpoint API)

TAG_RE = re.compile(r"^step_(\d{8})$")
STATE_FILE = "trainer_state.json"
PARAM_NAMES_FILE = "param_names.json"  # each pipeline stage's parameter names in optimizer order


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def layout_of(cfg: ExperimentConfig, topo) -> dict:
    """What a checkpoint's files depend on: resuming on another layout goes through pretrain/state/reshard.py."""
    return {"tp": topo.tp, "pp": topo.pp, "dp": topo.dp, "world_size": topo.world_size,
            "zero_stage": cfg.parallel.zero_stage, "precision": cfg.train.precision}


def save(built, cfg: ExperimentConfig, root: str, step: int, trainer_state: dict, topo) -> str:
    """Save on every rank; returns the checkpoint folder. `latest` moves only once all ranks are done."""
    rank = topo.rank
    tag = tag_for(step)
    folder = os.path.join(root, tag)
    if rank == 0 and os.path.isdir(folder):
        shutil.rmtree(folder)  # a partial folder from an interrupted save of this same step
    names = [None] * topo.world_size
    dist.all_gather_object(names, (topo.pp_rank, built.param_names))
    os.makedirs(root, exist_ok=True)
    # after a failed write the failed writer may still hold its file (and its space) until the process exits
    free_before = shutil.disk_usage(root).free

    def rank_files():
        built.engine.save_checkpoint(root, tag=tag, save_latest=False)
        os.makedirs(os.path.join(folder, "rng"), exist_ok=True)
        with atomic_writer(os.path.join(folder, "rng", f"rank_{rank:05d}.pt")) as f:
            torch.save(rng_state(), f)

    def completion():  # rank 0, once every rank's files are written
        save_config(cfg, os.path.join(folder, CONFIG_FILE))
        write_param_names(folder, dict(names))
        state = {"step": step, **trainer_state, "layout": layout_of(cfg, topo)}
        atomic_write(os.path.join(folder, STATE_FILE), json.dumps(state, indent=1))
        atomic_write(os.path.join(root, "latest"), tag + "\n")

    # A failed write (a full disk, a quota) on any rank is agreed on by all of them, so that none waits at a
    # barrier for the others: the partial folder is removed, `latest` still names the last complete step.
    _agree_on_write_failure(_try_write(rank_files), root, folder, step, free_before, topo)
    _agree_on_write_failure(_try_write(completion) if rank == 0 else None, root, folder, step, free_before, topo)
    if rank == 0:
        prune(root, keep=cfg.checkpoint.keep, protect=tag)
    dist.barrier()
    return folder


# What torch's serializer says when a write() came up short (it does not pass the OS error on).
_WRITE_FAILURES = ("unexpected pos", "file write failed", "No space left", "Disk quota exceeded")


def _try_write(write) -> Exception | None:
    """Run `write`; return the exception if it failed to write a file (any other exception propagates)."""
    try:
        write()
    except OSError as e:
        return e
    except RuntimeError as e:
        if any(s in str(e) for s in _WRITE_FAILURES):
            return e
        raise
    return None


def _agree_on_write_failure(error: Exception | None, root: str, folder: str, step: int, free: int, topo) -> None:
    """Every rank learns whether any rank failed to write; if one did, rank 0 removes the partial folder and
    every rank raises the same one-line UserError (the failing rank's reason, where it is this rank)."""
    flag = torch.tensor([0.0 if error is None else 1.0], device=topo.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return
    written = folder_bytes(folder)
    if topo.rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
    dist.barrier()
    raise UserError(write_failure_message(error, root, folder, step, written, free))


def write_failure_message(error: Exception | None, root: str, folder: str, step: int, written: int, free: int) -> str:
    previous = complete_tags(root)
    need = folder_bytes(os.path.join(root, previous[-1])) if previous else 0
    if need > written:
        needs = f"a checkpoint of this run takes {_mb(need)}"
    else:
        needs = f"it had written {_mb(written)} when it failed"
    reason = "" if error is None else f" ({str(error).splitlines()[0][:160]})"
    on_disk = f"latest still names {previous[-1]}" if previous else "no earlier checkpoint exists"
    return (f"checkpoint of step {step} could not be written to {folder}{reason}: {needs}, {_mb(free)} were free "
            "there when it began; "
            f"the partial folder was removed and {on_disk}; free space or set run.dir on a larger disk, then "
            "resume with train.resume=auto")


def folder_bytes(folder: str) -> int:
    total = 0
    for base, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(base, name))
            except OSError:
                pass
    return total


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def complete_tags(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    return sorted(t for t in os.listdir(root) if TAG_RE.match(t) and os.path.isfile(os.path.join(root, t, STATE_FILE)))


def prune(root: str, keep: int, protect: str) -> None:
    """Delete incomplete folders and all but the newest `keep` complete checkpoints (never `protect`)."""
    complete = complete_tags(root)
    doomed = [t for t in os.listdir(root) if TAG_RE.match(t) and t not in complete and t != protect]
    if keep > 0:
        doomed += [t for t in complete[:-keep] if t != protect]
    for t in doomed:
        shutil.rmtree(os.path.join(root, t), ignore_errors=True)


def resolve_resume(resume: str | None, root: str) -> str | None:
    """The checkpoint folder to resume from: None (fresh), `auto` (latest in the run, if any) or a path."""
    if resume is None:
        return None
    if resume == "auto":
        latest = os.path.join(root, "latest")
        if not os.path.isfile(latest):
            return None
        folder = os.path.join(root, open(latest).read().strip())
    else:
        folder = resume
    check_checkpoint(folder)
    return folder


def check_checkpoint(folder: str) -> None:
    if not os.path.isdir(folder):
        raise UserError(f"checkpoint {folder} does not exist; pass a checkpoints/step_XXXXXXXX folder of a run")
    if not os.path.isfile(os.path.join(folder, STATE_FILE)):
        raise UserError(
            f"checkpoint {folder} is incomplete (no {STATE_FILE}: its save was interrupted); "
            "resume from the folder named in checkpoints/latest instead"
        )


def read_state(folder: str) -> dict:
    with open(os.path.join(folder, STATE_FILE)) as f:
        return json.load(f)


def read_layout(folder: str, cfg: ExperimentConfig | None = None) -> dict:
    """The layout a checkpoint was saved on (for checkpoints of earlier versions: from its config and files)."""
    state = read_state(folder)
    if "layout" in state:
        return state["layout"]
    cfg = cfg or read_stored_config(folder)
    dp = int(compat.load_file(compat.model_states_path(folder, 0))["dp_world_size"])
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    return {"tp": tp, "pp": pp, "dp": dp, "world_size": tp * pp * dp, "zero_stage": cfg.parallel.zero_stage,
            "precision": cfg.train.precision}


def load(engine, folder: str, rank: int) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG with DeepSpeed (same layout as the save);
    returns the trainer state. Another layout: pretrain/state/reshard.py."""
    check_checkpoint(folder)
    root, tag = os.path.split(os.path.normpath(folder))
    try:
        path, _ = engine.load_checkpoint(root, tag=tag)
    except (RuntimeError, KeyError, FileNotFoundError, AssertionError, ValueError) as e:
        # load_state_dict names the keys on the lines after its first ("Missing key(s) in state_dict: ...").
        detail = " ".join(line.strip() for line in str(e).splitlines()[:3] if line.strip())[:400]
        raise UserError(
            f"cannot load checkpoint {folder}: {detail}; it must come from a run with the same model (a model of an "
            "earlier normlab version whose scheme gained a parameter since, e.g. dyt's embedding scale or peri_ln's "
            "embedding norm, continues under that version)"
        ) from None
    if path is None:
        raise UserError(f"cannot load checkpoint {folder}: DeepSpeed found no model states for this rank's layout")
    load_rng(folder, rank)
    return read_state(folder)


def load_rng(folder: str, rank: int) -> None:
    """This rank's RNG state, where the checkpoint has one for this rank (a larger world starts the rest from the
    seed; training is dropout-free, so nothing draws from it between steps)."""
    rng_file = os.path.join(folder, "rng", f"rank_{rank:05d}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))


def load_model_state(folder: str,
                     cfg: ExperimentConfig | None = None) -> tuple[ExperimentConfig, dict[str, torch.Tensor]]:
    """The full (TP = 1, unpipelined) model state dict of a training checkpoint, any TP/PP layout; no
    torch.distributed needed. Reads DeepSpeed's files directly. `cfg`: the checkpoint's stored config where the
    caller has read it already. (Commands read a model through `pretrain.state.sources.open_source`, which also
    takes Hugging Face directories.)"""
    check_checkpoint(folder)
    cfg = cfg or read_stored_config(folder)
    tp = cfg.parallel.tp
    files = os.listdir(folder)
    per_rank: list[dict] = [{} for _ in range(tp)]
    layer_files = sorted(f for f in files if f.startswith("layer_") and f.endswith("-model_states.pt"))
    if layer_files:  # pipeline-parallel layout: one file per (layer, tp rank)
        for f in layer_files:
            m = re.match(r"layer_(\d+)(?:-model_(\d+))?-model_states\.pt$", f)
            if m is None:
                continue
            layer, tp_rank = int(m.group(1)), int(m.group(2) or 0)
            prefix = full_name_prefix(cfg.model, layer)
            sd = torch.load(os.path.join(folder, f), map_location="cpu", weights_only=False)
            per_rank[tp_rank].update({prefix + k: v for k, v in sd.items()})
    else:
        for r in range(tp):
            path = os.path.join(folder, f"mp_rank_{r:02d}_model_states.pt")
            if not os.path.isfile(path):
                raise UserError(f"checkpoint {folder} has no {os.path.basename(path)}; is it a complete training checkpoint?")
            per_rank[r] = torch.load(path, map_location="cpu", weights_only=False)["module"]
    if cfg.model.tie_embeddings:
        for sd in per_rank:
            sd.pop("head.weight", None)
    full = merge_state_dicts(per_rank, Llama.meta(cfg.model, tp)) if tp > 1 else per_rank[0]
    return cfg, {k: v.float() for k, v in full.items()}


def write_param_names(folder: str, names_by_stage: dict[int, list[list[str]]]) -> None:
    atomic_write(os.path.join(folder, PARAM_NAMES_FILE), json.dumps({str(k): v for k, v in names_by_stage.items()}))


def read_param_names(folder: str) -> dict[int, list[list[str]]] | None:
    path = os.path.join(folder, PARAM_NAMES_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return {int(k): v for k, v in json.load(f).items()}
