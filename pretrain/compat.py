"""Every use of DeepSpeed, megatron-core, torch and TensorBoard internals, in one place.

Public APIs are used everywhere else; what follows reaches into private attributes or on-disk formats that a
new release may change. Importing this module checks that the installed versions are inside the ranges the
test suite ran against (TESTED below, the same ranges `setup.cfg` pins) and says how to fix it otherwise;
`NORMLAB_ALLOW_UNTESTED=1` turns that error into a warning, for trying a new release.

What is here:
  * DeepSpeed checkpoint files: names and contents of the model-state and (ZeRO / bf16) optimizer-state files,
    read by `pretrain/state/reshard.py` to resume on another layout.
  * DeepSpeed's communication backend: its C++ shared-memory op, which is not built (`skip_shm_comm_op`).
  * megatron-core's package layout: `parallel_state` imported without the package's `__init__`, which imports the
    whole library (`megatron_parallel_state`).
  * DeepSpeed engine internals: the optimizer that holds the Adam state behind a ZeRO / bf16 wrapper, the
    fp32 master fragments each rank owns (`_hp_mapping`), ZeRO's own gradient-clipping value, and the hook
    before every optimizer step (`_take_model_step`) the per-layer gradient norms need.
  * torch: the compiled forward that `nn.Module.compile` installs (`_compiled_call_impl`), and dynamo's count of
    the graphs it has compiled (`torch._dynamo.utils.counters`), which train.compile's recompilation count reads.
  * TensorBoard: writing many scalars as one event (the writer's file writer and Summary proto).
  * trackio: the folder of its databases, read once when it is imported (`set_trackio_dir`).

models/ uses megatron-core's public tensor_parallel layers only (models must not depend on pretrain/), and
DeepSpeed's public pipeline, topology and `safe_*_full_*` APIs are used where they are needed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from pretrain.errors import UserError

if TYPE_CHECKING:
    import torch  # annotations only

# torch is imported by the functions that need it, not here: every command imports this module for its version
# check, and `pretrain --help` (which reads the installed version here) must start without torch.

# The ranges the test suite ran against, the same as setup.cfg's install_requires (tests/pretrain/test_compat.py checks
# that they agree): package -> (lowest tested version, first untested version). The ends of each range are what
# CI installs (docs/versions.md): Python 3.11 with torch 2.13 and megatron-core 0.16; Python 3.12 with
# the GPU machines' stack (torch 2.11, megatron-core 0.19, transformers 5.17, sentencepiece 0.2.2) and with the
# newest releases (torch 2.15).
PYTHON = ("3.10", "3.14")
TESTED = {
    "torch": ("2.11", "2.16"),
    # 0.19.3: pipeline parallelism with gradient accumulation scaled the earlier stages' gradients by 1/GAS^2
    # before it (DeepSpeed #8152); 0.19.0 fixed the bf16 optimizer dropping a micro-batch under ZeRO-1 (#7985).
    "deepspeed": ("0.19.3", "0.20"),
    # 0.16 is the last release for Python 3.10/3.11, 0.17-0.19 need Python >= 3.12: pip picks by the Python.
    "megatron-core": ("0.16", "0.20"),
    "transformers": ("5.17", "6"),
    "safetensors": ("0.8", "1"),
    "datasets": ("5.2", "6"),
    "sentencepiece": ("0.2.2", "0.3"),
    "tokenizers": ("0.23.1", "0.24"),  # data prepare's --backend tokenizers; transformers 5.25 pins this range too
    "numpy": ("2.2", "3"),  # 2.3 and later need Python >= 3.11
    "pyyaml": ("6.0.1", "7"),
    "jinja2": ("3.1", "4"),  # lm-eval task templates (pretrain eval-choices); torch depends on it too
    "tensorboard": ("2.18", "3"),
    "matplotlib": ("3.9", "4"),
    "tqdm": ("4.66", "5"),
    "ninja": ("1.11", "2"),
}


def _parse(version: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def _range(low: str, high: str) -> str:
    return f">={low},<{high}"


def installed_version(package: str) -> str | None:
    """The installed distribution's version, or None when it is not installed (a checkout never pip-installed)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def version_problems() -> list[str]:
    """One phrase per package (and the Python) outside its tested range or missing, with the fix."""
    bad = []
    python = ".".join(map(str, sys.version_info[:3]))
    if not _parse(PYTHON[0]) <= _parse(python) < _parse(PYTHON[1]):
        bad.append(f"Python {python} is outside {_range(*PYTHON)} (use a Python in that range)")
    for package, (low, high) in TESTED.items():
        spec = f"'{package}{_range(low, high)}'"
        installed = installed_version(package)
        if installed is None:
            bad.append(f"{package} is not installed (pip install {spec}; without network: the GPU kit's wheels, "
                       "docs/PERFORMANCE.md)")
            continue
        if not _parse(low) <= _parse(installed) < _parse(high):
            bad.append(f"{package} {installed} is outside the tested range {_range(low, high)} (pip install {spec})")
    return bad


def check_versions() -> None:
    """A one-line UserError naming every package outside its tested range and how to fix it, or a warning under
    NORMLAB_ALLOW_UNTESTED=1. `pretrain` runs this before any command, and importing this module runs it too."""
    bad = version_problems()
    if not bad:
        return
    message = (f"untested versions: {'; '.join(bad)}; or set NORMLAB_ALLOW_UNTESTED=1 to try anyway "
               "(pretrain/compat.py lists what may break)")
    if os.environ.get("NORMLAB_ALLOW_UNTESTED") == "1":
        warnings.warn(message, stacklevel=2)
    else:
        raise UserError(message)


check_versions()


# ----------------------------------------------------------------------------------------------------------
# DeepSpeed checkpoint files
#
#   mp_rank_XX_model_states.pt          one per model-parallel rank XX = pp_rank * tp + tp_rank (DeepSpeed's
#                                       rank inside one data-parallel replica): 'module' (None under pipeline
#                                       parallelism), 'optimizer' (the torch optimizer state dict at ZeRO 0
#                                       without bf16, else None), 'lr_scheduler', 'global_steps',
#                                       'global_samples', 'skipped_steps', 'dp_world_size', 'mp_world_size'
#   layer_LL-model_TT-model_states.pt   pipeline layer LL's weights on tensor-parallel rank TT
#   [bf16_]zero_pp_rank_D_mp_rank_XX_optim_states.pt
#                                       ZeRO 1-2 and the bf16 optimizer: data-parallel rank D's partition of the
#                                       fp32 master weights and Adam moments, as one flat tensor per param group,
#                                       with 'param_slice_mappings' (param name -> (start, numel) in it)
# ----------------------------------------------------------------------------------------------------------

MODEL_STATES = "mp_rank_{mp:02d}_model_states.pt"
OPTIM_STATES_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def load_file(path: str) -> dict:
    import torch  # here, not at the top: see the imports
    # mmap: a rank that needs a few tensors of a large file does not read all of it
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def model_states_path(folder: str, mp_rank: int) -> str:
    return os.path.join(folder, MODEL_STATES.format(mp=mp_rank))


def optimizer_partition_paths(folder: str, mp_rank: int) -> list[str]:
    """The ZeRO / bf16 optimizer files of one model-parallel rank, in data-parallel rank order ([] at ZeRO 0)."""
    found = {}
    for name in os.listdir(folder):
        m = OPTIM_STATES_RE.match(name)
        if m and int(m.group(2)) == mp_rank:
            found[int(m.group(1))] = os.path.join(folder, name)
    if found and sorted(found) != list(range(len(found))):
        raise UserError(f"checkpoint {folder} lacks optimizer files of some data-parallel ranks; it is incomplete")
    return [found[d] for d in sorted(found)]


@dataclass
class ParamState:
    """One parameter's training state as a flat fp32 tensor per entry (its model-parallel shard)."""

    master: torch.Tensor | None  # fp32 master weights (None: take the model states' weights)
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor


def read_plain_optimizer(model_states: dict, names: list[list[str]]) -> tuple[dict[str, ParamState], int | None]:
    """Adam state of a torch optimizer saved in the model-states file (ZeRO 0, fp32): its state is keyed by the
    parameter's index over the param groups, `names` gives those parameters' names in the same order."""
    opt = model_states.get("optimizer")
    if not opt or "state" not in opt:
        raise UserError("checkpoint: the model-states file holds no optimizer state; it cannot be resharded")
    flat_names = [n for group in names for n in group]
    indices = [i for g in opt["param_groups"] for i in g["params"]]
    if len(indices) != len(flat_names):
        raise UserError(
            f"checkpoint: its optimizer has {len(indices)} parameters but its recorded names list {len(flat_names)}"
        )
    out, step = {}, None
    for index, name in zip(indices, flat_names):
        state = opt["state"].get(index)
        if not state:  # never stepped (every step so far skipped): zero moments
            continue
        out[name] = ParamState(None, state["exp_avg"].float().flatten(), state["exp_avg_sq"].float().flatten())
        step = int(state["step"])
    return out, step


def read_optimizer_partitions(paths: list[str]) -> tuple[dict[str, ParamState], int | None]:
    """Master weights and Adam moments of every parameter of one model-parallel rank from its ZeRO / bf16 optimizer
    partitions (one file per data-parallel rank): each parameter's fragments concatenated in rank order."""
    import torch  # here, not at the top: see the imports
    pieces: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    step = None
    for path in paths:
        sd = load_file(path)["optimizer_state_dict"]
        base = sd["base_optimizer_state"]
        states = base["state"]
        for group, (flat, mapping) in enumerate(zip(sd["single_partition_of_fp32_groups"], sd["param_slice_mappings"])):
            state = states.get(group) if isinstance(states, dict) else states[group]
            for name, frag in mapping.items():
                sl = slice(frag.start, frag.start + frag.numel)
                if state:
                    moments = (state["exp_avg"][sl], state["exp_avg_sq"][sl])
                else:
                    moments = (torch.zeros(frag.numel), torch.zeros(frag.numel))
                pieces.setdefault(name, []).append((flat[sl], *moments))
            if state and "step" in state:
                step = int(state["step"])
    out = {}
    for name, frags in pieces.items():
        master, avg, avg_sq = (torch.cat([f[i].float() for f in frags]) for i in range(3))
        out[name] = ParamState(master, avg, avg_sq)
    return out, step


def scheduler_position(model_states: dict) -> int:
    """How many scheduler steps the run had taken (LambdaLR's last_epoch)."""
    return int(model_states["lr_scheduler"]["last_epoch"])


# ----------------------------------------------------------------------------------------------------------
# DeepSpeed engine internals
# ----------------------------------------------------------------------------------------------------------


def wrapped_optimizer(engine):
    """The torch optimizer whose `state` holds the Adam moments: behind ZeRO's / bf16's wrapper, or the client
    optimizer itself at ZeRO 0 in fp32."""
    opt = engine.optimizer
    return opt.optimizer if is_partitioned(engine) else opt


def is_partitioned(engine) -> bool:
    """Whether the optimizer keeps flat fp32 partitions (ZeRO 1-2, bf16) rather than per-parameter state."""
    return any(getattr(p, "_hp_mapping", None) is not None for p in engine.module.parameters())


def set_param_state(engine, param: torch.nn.Parameter, master: torch.Tensor, exp_avg: torch.Tensor,
                    exp_avg_sq: torch.Tensor, step: int) -> None:
    """Give one parameter (this rank's shard) its fp32 master weights, Adam moments and step, whatever the
    optimizer: a plain one (per-parameter state) or a partitioned one (this rank's fragment of the flat fp32
    partition, located by DeepSpeed's `_hp_mapping`)."""
    import torch  # here, not at the top: see the imports
    with torch.no_grad():
        param.data.copy_(master.view_as(param))
        mapping = getattr(param, "_hp_mapping", None)
        if not is_partitioned(engine):
            opt = engine.optimizer
            opt.state[param] = {
                "step": _step_tensor(step, param, _group_of(opt, param)),
                "exp_avg": exp_avg.view_as(param).to(param.dtype).clone(),
                "exp_avg_sq": exp_avg_sq.view_as(param).to(param.dtype).clone(),
            }
            return
        if mapping is None:
            return  # none of this parameter lies in this rank's partition
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        mapping.hp_fragment.copy_(master.flatten().narrow(0, lp.start, lp.numel))
        state = _partition_state(engine, mapping.param_group_index, step)
        for key, value in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            state[key].narrow(0, hp.start, hp.numel).copy_(value.flatten().narrow(0, lp.start, lp.numel))


def _partition_state(engine, group_index: int, step: int) -> dict:
    import torch  # here, not at the top: see the imports
    base = engine.optimizer.optimizer
    (flat,) = base.param_groups[group_index]["params"]
    state = base.state[flat]
    if "exp_avg" not in state:  # torch's Adam creates its state lazily, at the first step
        state.update(exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat))
    state["step"] = _step_tensor(step, flat, base.param_groups[group_index])
    return state


def _group_of(opt, param) -> dict:
    return next(g for g in opt.param_groups if any(p is param for p in g["params"]))


def _step_tensor(step: int, param: torch.Tensor, group: dict) -> torch.Tensor:
    import torch  # here, not at the top: see the imports
    # torch's Adam keeps `step` on the CPU unless the fused or capturable kernels run
    on_device = group.get("fused") or group.get("capturable")
    return torch.tensor(float(step), dtype=torch.float32, device=param.device if on_device else "cpu")


def relink_partitions(engine) -> None:
    """After filling a partitioned optimizer's state by hand, let DeepSpeed re-point its per-parameter views
    (what `safe_get_full_optimizer_state` reads) at the new tensors."""
    link = getattr(engine.optimizer, "_link_all_hp_params", None)
    if link is not None:
        link()


def set_zero_clip(engine, clip: float) -> None:
    """ZeRO / bf16 optimizers restore the clipping value saved in the checkpoint; the config's must win."""
    if hasattr(engine.optimizer, "clip_grad"):
        engine.optimizer.clip_grad = clip


def set_engine_counters(engine, global_steps: int, global_samples: int, skipped_steps: int) -> None:
    engine.global_steps, engine.global_samples, engine.skipped_steps = global_steps, global_samples, skipped_steps


def skip_shm_comm_op() -> None:
    """Keep DeepSpeed from building its C++ shared-memory all-reduce. On the CPU accelerator every
    `deepspeed.init_distributed` JIT-compiles `deepspeed_shm_comm_op` into the shared ~/.cache/torch_extensions,
    silently, 80-260 s on 2 cores, and again whenever another environment built it last. The op serves only
    `inference_all_reduce` (DeepSpeed-inference's tensor parallelism on CPU), which training never calls: our
    all-reduces are torch.distributed's (gloo on CPU, nccl on GPU). On GPU the builder does not exist; a no-op."""
    import importlib  # only where ranks start: DeepSpeed is heavy to import

    # not `import deepspeed.comm.torch as m`: that binds deepspeed.comm's attribute `torch`, the torch package
    torch_backend = importlib.import_module("deepspeed.comm.torch")
    torch_backend.build_shm_op = lambda: None  # TorchBackend.__init__ looks the function up at call time


def megatron_parallel_state():
    """megatron-core's `parallel_state` (every layout's process groups), without running megatron.core's package
    `__init__` first: that imports the whole library (tensor_parallel, distributed, inference and through it wandb),
    about 1.8 s of every rank's start, where a rank without tensor parallelism needs the groups alone. The package
    is registered as found, its `__init__` deferred: its modules import as usual (megatron's own `from megatron.core
    import config` included), and the first other name asked of it (`megatron.core.ModelParallelConfig`,
    `__version__`) runs the `__init__`, as `load_megatron_core` does before the tensor-parallel layers are built."""
    if "megatron.core" not in sys.modules:
        spec = importlib.util.find_spec("megatron.core")
        package = importlib.util.module_from_spec(spec)  # __path__ and __spec__ set, __init__ not run
        package.__getattr__ = lambda name: _deferred_megatron_attribute(package, name)
        sys.modules["megatron.core"] = package
        sys.modules["megatron"].core = package
    return importlib.import_module("megatron.core.parallel_state")


def _deferred_megatron_attribute(package, name: str):
    if not name.startswith("__") and importlib.util.find_spec(f"megatron.core.{name}") is not None:
        return importlib.import_module(f"megatron.core.{name}")  # a module of the package
    load_megatron_core()
    return getattr(package, name)  # (the package's __getattr__ is gone: an AttributeError if __init__ has no such name)


def load_megatron_core() -> None:
    """Run megatron.core's `__init__` where `megatron_parallel_state` deferred it (the TP layers' imports need the
    whole package: run inside one of its modules' imports, the `__init__` would meet half-initialized ones)."""
    package = sys.modules.get("megatron.core")
    if package is not None and package.__dict__.pop("__getattr__", None) is not None:
        with warnings.catch_warnings():  # Transformer Engine / Apex absent: we use neither
            warnings.simplefilter("ignore")
            package.__spec__.loader.exec_module(package)


def wrap_model_step(engine, before) -> None:
    """Call `before()` right before each optimizer step: the accumulated, data-parallel-averaged gradients are
    complete there in both engines (inside `engine.step()` and the PipelineEngine's schedule)."""
    original = getattr(engine, "_take_model_step", None)
    if original is None:
        raise RuntimeError("this DeepSpeed engine has no _take_model_step; per-layer gradient norms need it")

    def take_model_step(*args, **kwargs):
        before()
        return original(*args, **kwargs)

    engine._take_model_step = take_model_step


# ----------------------------------------------------------------------------------------------------------
# torch and TensorBoard
# ----------------------------------------------------------------------------------------------------------


def suspend_compiled(module: torch.nn.Module):
    """Make a `module.compile()`d module run eagerly (hooks added after compiling run); returns what to restore."""
    compiled = getattr(module, "_compiled_call_impl", None)
    if compiled is not None:
        module._compiled_call_impl = None
    return compiled


def restore_compiled(module: torch.nn.Module, compiled) -> None:
    if compiled is not None:
        module._compiled_call_impl = compiled


@contextlib.contextmanager
def eager_modules(root: torch.nn.Module):
    """Every `module.compile()`d module under `root` (itself included) runs eagerly inside the `with`, and its
    compiled version (the same object: no recompilation) afterwards."""
    saved = [(m, suspend_compiled(m)) for m in root.modules()]
    try:
        yield
    finally:
        for m, compiled in saved:
            restore_compiled(m, compiled)


def compiled_graphs() -> int:
    """How many graphs torch.compile (dynamo) has compiled in this process so far, first compilations and
    recompilations alike (dynamo's `unique_graphs` counter; one per frame it captured, a graph break making two)."""
    from torch._dynamo.utils import counters  # here, not at the top: see the imports (and dynamo only when compiling)

    return int(counters["stats"]["unique_graphs"])


def add_scalars(tb, scalars: list[tuple[str, float]], step: int) -> None:
    """Many scalars as ONE TensorBoard event (what add_scalar writes, ~50 times cheaper than 50 events)."""
    writer = getattr(tb, "_get_file_writer", None)
    if writer is None:
        for tag, v in scalars:
            tb.add_scalar(tag, v, step)
        return
    from tensorboard.compat.proto.summary_pb2 import Summary  # tensorboard's protobufs: only where scalars are written

    writer().add_summary(Summary(value=[Summary.Value(tag=tag, simple_value=float(v)) for tag, v in scalars]), step)


def set_trackio_dir(folder: str) -> None:
    """Make trackio keep its databases in `folder`. trackio reads TRACKIO_DIR from the environment once, when it is
    imported (trackio.utils.TRACKIO_DIR, MEDIA_DIR, ARTIFACTS_DIR, copied into the modules that import them by name):
    set it before the import; in a process that imported trackio for an earlier run (`pretrain remove-norms` trains
    its control after the removal run) those copies are pointed at the new folder."""
    os.environ["TRACKIO_DIR"] = folder
    if "trackio.utils" not in sys.modules:
        return
    new = {"TRACKIO_DIR": Path(folder), "MEDIA_DIR": Path(folder) / "media", "ARTIFACTS_DIR": Path(folder) / "artifacts"}
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "trackio" or name.startswith("trackio.")):
            continue
        for attr, path in new.items():
            if isinstance(getattr(module, attr, None), Path):
                setattr(module, attr, path)
