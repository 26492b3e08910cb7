"""`pretrain plan` (pretrain/analysis/plan.py) against what training really holds, on CPU:

* weights, gradients, ZeRO's reduction bucket and optimizer state: the bytes of the real engine's tensors
  (pretrain/train/engine.py, gloo), summed per rank at the second optimizer step, equal the plan's for `tiny` and a
  `small` variant (tied embeddings, full-width QK-norm, GPAS, an odd vocabulary) under ZeRO 0-2 (fp32 and bf16) in
  one process, and under dp 2 (ZeRO 1, 2), tp 2 and pp 2 (bf16 without ZeRO: DeepSpeed's bf16 optimizer; ZeRO 1) in
  two ranks;
* what a block keeps for backward: the tensors autograd saves (its saved-tensor hooks, per token) equal the plan's
  count for every scheme and composable key, fp32 and bf16, no / selective / full checkpointing, and under tp 2;
* the activation estimate (activations + logits/loss) within 15% of the measured peak-memory rise of one forward and
  backward (torch's CPU allocator, as the profiler records its allocations and frees) for four shapes;
* the command: its text, its --json keys and its one-line errors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers.distributed import one_rank, run_distributed_test  # noqa: F401 (a fixture)
from helpers.train import REPO, random_lm_batches

from models.config import ModelConfig
from models.llama import Llama, recompute
from models.norms import NORM_SCHEMES
from pretrain.analysis.plan import (GIB, block_activations, plan, rank_parameters, stage_modules, state_bytes)
from pretrain.cli import main
from pretrain.config import load_config
from pretrain.gpus import GPUS, find, for_device_name

SHORT = ["data.seq_len=16", "train.micro_batch_size=2", "train.global_batch_size=2", "eval.interval=0",
         "run.dir=/tmp/normlab-plan-test"]
TINY = ["model.preset=tiny"]
# tiny's shape with what changes the parameter list: a tied embedding (on two pipeline stages), full-width q/k norms
# (split with the heads under TP), GPAS's scalar gates, an odd vocabulary (padding of ZeRO's flat groups)
SMALL = ["model.preset=tiny", "model.tie_embeddings=true", "model.qk_norm=full", "model.gpas=true",
         "model.vocab_size=2050", "model.n_layers=4"]


# ------------------------------------------------------------------------------------------- the GPU table


def test_gpu_names():
    assert find("H100").name == find("h100-sxm").name == find("NVIDIA H100 80GB HBM3").name == "H100 SXM"
    assert find("A100-80GB").name == find("a100").name == "A100 80GB" and find("A100-40GB").memory_gib == 40.0
    h200, b200 = find("H200"), find("B200")
    assert h200.memory_gib > 140 and h200.peak_bf16_flops == 989e12  # its own row: not an H100's or A100's memory
    assert b200.peak_bf16_flops == 2.25e15 and b200.memory_gib > 170
    assert for_device_name("NVIDIA H100 PCIe").name == "H100 PCIe" and for_device_name("Tesla T4") is None
    assert len({g.name for g in GPUS}) == len(GPUS)


def test_pipeline_stages_are_cut_as_deepspeed_cuts_them():
    from deepspeed.runtime.utils import partition_balanced as deepspeeds  # what PipelineModule calls

    from pretrain.analysis.plan import partition_balanced

    for layers in range(1, 25):
        for pp in range(1, min(layers, 8) + 1):
            weights = [0] + [1] * layers + [0, 0]  # embedding, blocks, final norm, head
            assert partition_balanced(weights, pp) == list(deepspeeds(weights, pp)), (layers, pp)


# ------------------------------------------------------------------------------------------- what a block keeps


def saved_bytes(model: Llama, layer: int, dtype: torch.dtype, tokens: int) -> int:
    """Bytes of the tensors block `layer` saves for backward on a [2, tokens / 2] input (each storage once, the
    weights and RoPE tables left out)."""
    fixed = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in fixed:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(2, tokens // 2, model.cfg.d_model, dtype=dtype, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.blocks[layer](x, model.rope_cos, model.rope_sin)
    return sum(seen.values())


def per_token_saved(model: Llama, layer: int, dtype: torch.dtype) -> float:
    """Per token: the difference of two lengths, so that what does not grow with the tokens (gain vectors made in
    forward, nGPT's scales) drops out."""
    return (saved_bytes(model, layer, dtype, 48) - saved_bytes(model, layer, dtype, 16)) / 32


SHAPE = dict(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=64)
KEYS = [dict(norm_scheme=s) for s in NORM_SCHEMES] + [
    dict(norm_type="layernorm"), dict(qk_norm="head"), dict(qk_norm="full"), dict(qk_norm="full", norm_type="layernorm"),
    dict(attn_gate="headwise"), dict(attn_gate="elementwise"), dict(gpas=True), dict(norm_scheme="deepnorm", gpas=True),
    dict(norm_scheme="ln_free", n_layers=16), dict(norm_scheme="dyt", dyt_bias=True), dict(n_kv_heads=1, qk_norm="full"),
    dict(norm_scheme="hybridnorm", n_kv_heads=4), dict(norm_scheme="reordered", qk_norm="full", n_kv_heads=4),
    dict(qk_norm="head", removable_norms=True), dict(norm_gain="zero_centered")]


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("keys", KEYS, ids=["-".join(f"{v}" for v in k.values()) for k in KEYS])
def test_what_a_block_keeps_is_counted_exactly(keys):
    cfg = ModelConfig(**{**SHAPE, **keys})
    meta = Llama.meta(cfg)
    for dtype, width in ((torch.float32, 4), (torch.bfloat16, 2)):
        model = Llama(cfg, seed=0).to(dtype)
        for mode in ("none", "selective", "full"):
            recompute(model, mode)
            for layer in (0, 1):  # hybridnorm_star's first block differs
                assert block_activations(meta.blocks[layer], cfg, width, 1, mode) == \
                    per_token_saved(model, layer, dtype), (keys, dtype, mode, layer)


# ------------------------------------------------------------------------------------------- the measured peak


def allocated_peak(fn) -> int:
    """The peak of the bytes torch's CPU allocator holds while `fn` runs, over what it held before: its allocations
    and frees as the profiler records them (profile_memory), summed in time order."""
    from torch.profiler import ProfilerActivity, profile  # the allocator's events: this measurement only

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


BLOCKS = ["model.vocab_size=256", "model.d_model=256", "model.n_heads=4", "model.n_kv_heads=2",
          "model.ffn_hidden=688", "model.max_seq_len=512"]
PEAK_CASES = {  # name: overrides (fp32, one sequence of 512 per micro-batch... see `plan_case`)
    "plain": [*BLOCKS, "model.n_layers=4"],
    "unfused loss": ["model.vocab_size=8192", "model.d_model=128", "model.n_layers=2", "model.n_heads=4",
                     "model.n_kv_heads=2", "model.ffn_hidden=352", "model.max_seq_len=512", "train.fused_loss=false"],
    "full checkpointing": [*BLOCKS, "model.n_layers=8", "train.activation_checkpointing=full"],
    "selective": [*BLOCKS, "model.n_layers=4", "model.n_kv_heads=4", "train.activation_checkpointing=selective"],
}


def peak_case_errors() -> dict[str, tuple[float, float]]:
    out = {}
    for name, overrides in PEAK_CASES.items():
        cfg = load_config(None, [*overrides, "data.seq_len=512", "train.micro_batch_size=2",
                                 "train.global_batch_size=2"])
        parts = plan(cfg, find("H100"))["memory_breakdown_gib"]
        estimate = (parts["activations"] + parts["logits_loss"]) * GIB
        torch.manual_seed(0)
        model = Llama(cfg.model, seed=0)
        recompute(model, cfg.train.activation_checkpointing, cfg.train.fused_loss)
        tokens = torch.randint(cfg.model.vocab_size, (2, 512))
        labels = torch.roll(tokens, -1, 1)
        model(tokens, labels).backward()  # the gradients exist: the step adds activations only
        measured = allocated_peak(lambda: model(tokens, labels).backward())
        out[name] = (estimate, measured)
    return out


@pytest.mark.usefixtures("single_thread")
def test_activation_estimate_is_within_15_percent_of_the_measured_peak():
    errors = {}
    for name, (estimate, measured) in peak_case_errors().items():
        errors[name] = estimate / measured - 1
        print(f"{name}: plan {estimate / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB, "
              f"{100 * errors[name]:+.1f}%")
    assert all(abs(e) <= 0.15 for e in errors.values()), errors


# ------------------------------------------------------------------------------------------- weights, gradients, Adam


def engine_state(cfg, topo) -> dict:
    """Build the engine for `cfg`, take two optimizer steps and return the bytes this rank holds at the second one
    (before the update): the weights' storages, the gradients (.grad and the optimizer's gradient partitions and
    buffers), the fp32 master weights and Adam's moments, and the largest gradient reduction bucket a backward
    allocated. Scalars (Adam's step counts, the gradient norm) are left out, as the plan leaves them."""
    from pretrain import compat
    from pretrain.train.engine import build_engine
    from pretrain.train.steps import train_step

    built = build_engine(cfg, topo)
    opt = built.engine.optimizer
    got = {"bucket": 0, "steps": 0}
    release = getattr(opt, "_release_ipg_buffers", None)
    if release is not None:  # ZeRO 1-2: the bucket is alive until the end of each backward
        def releasing():
            held = {b.untyped_storage().data_ptr(): b.untyped_storage().nbytes()
                    for bucket in opt.ipg_buckets.values() for b in bucket.buffer}
            got["bucket"] = max(got["bucket"], sum(held.values()))
            return release()
        opt._release_ipg_buffers = releasing

    def measure():
        got["steps"] += 1
        if got["steps"] == 2:
            got.update(tensors_held(built.model, opt))

    compat.wrap_model_step(built.engine, measure)
    for seed in range(2):
        train_step(built, random_lm_batches(cfg.model.vocab_size, built.gas, seed=seed + 10 * topo.dp_rank,
                                            rows=cfg.train.micro_batch_size, seq_len=cfg.data.seq_len), topo)
    return got


def tensors_held(model: torch.nn.Module, opt) -> dict:
    params = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    found: dict[str, dict[int, int]] = {"grads": {}, "optimizer": {}, "other": {}}

    def add(kind: str, t: torch.Tensor, path: str) -> None:
        storage = t.untyped_storage()
        if t.device.type == "meta" or t.dim() == 0 or storage.data_ptr() in params:
            return
        if not any(storage.data_ptr() in v for v in found.values()):
            found[kind][storage.data_ptr()] = storage.nbytes()
            if kind == "other":
                found.setdefault("paths", {})[storage.data_ptr()] = path

    def walk(obj, path: str, seen: set, depth: int = 0) -> None:
        if depth > 8:
            return
        if isinstance(obj, torch.Tensor):
            kind = ("optimizer" if ("state" in path and "exp_avg" in path) or "param_groups" in path
                    or "fp32_groups_flat_partition" in path or "single_partition_of_fp32" in path
                    else "grads" if "grad" in path else "other")
            add(kind, obj, path)
            if obj.grad is not None:
                add("grads", obj.grad, path + ".grad")
            return
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{path}[{k if isinstance(k, (str, int)) else 'p'}]", seen, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{path}[{i}]", seen, depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)) and \
                type(obj).__module__.split(".")[0] in ("deepspeed", "torch", "pretrain"):
            for k, v in vars(obj).items():
                walk(v, f"{path}.{k}", seen, depth + 1)

    for p in model.parameters():
        if p.grad is not None:
            add("grads", p.grad, "param.grad")
    walk(opt, "opt", set())
    return {"params": sum(params.values()), "grads": sum(found["grads"].values()),
            "optimizer": sum(found["optimizer"].values()),
            "other": {found["paths"][k]: v for k, v in found["other"].items()}}


def planned_state(overrides: list[str], world: int, pp_rank: int, dp_rank: int) -> dict:
    cfg = load_config(None, [*SHORT, *overrides])
    lay = plan(cfg, find("H100"), world)["layout"]
    modules = stage_modules(cfg.model, lay["pp"])[pp_rank]
    return state_bytes(rank_parameters(modules, lay["tp"]), cfg, lay["dp"], lay["grad_accumulation"], dp_rank)


def check_state(got: dict, overrides: list[str], world: int, pp_rank: int, dp_rank: int) -> None:
    want = planned_state(overrides, world, pp_rank, dp_rank)
    what = f"{overrides} on {world} rank(s), stage {pp_rank}, dp rank {dp_rank}"
    assert not got["other"], f"{what}: tensors the plan does not know: {got['other']}"
    for key, measured in (("params", "params"), ("grads", "grads"), ("optimizer", "optimizer"),
                          ("grad_buckets", "bucket")):
        assert got[measured] == want[key], f"{what}: {key} measured {got[measured]:,} B, planned {want[key]:,} B"


SINGLE = [  # (overrides) in one process; the first of each model in the fast tier
    [*TINY, "parallel.zero_stage=0"],
    [*TINY, "parallel.zero_stage=1", "train.precision=bf16"],
    [*SMALL, "parallel.zero_stage=2"],
    pytest.param([*TINY, "parallel.zero_stage=1"], marks=pytest.mark.slow),
    pytest.param([*TINY, "parallel.zero_stage=2", "train.precision=bf16"], marks=pytest.mark.slow),
    pytest.param([*SMALL, "parallel.zero_stage=0"], marks=pytest.mark.slow),
    pytest.param([*SMALL, "parallel.zero_stage=1", "train.precision=bf16"], marks=pytest.mark.slow),
]



@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("overrides", SINGLE, ids=lambda o: " ".join(x.split("=")[-1] for x in o))
def test_weights_gradients_and_adam_are_the_engines_in_one_process(one_rank, overrides):
    check_state(engine_state(load_config(None, [*SHORT, *overrides]), one_rank), overrides, 1, 0, 0)


@pytest.mark.usefixtures("single_thread")
def test_zero1_with_accumulation_holds_the_full_gradients_between_micro_batches(one_rank):
    """ZeRO 1 keeps each micro-batch's gradients in .grad until the last one: the plan adds them to the partition."""
    from pretrain.train.engine import build_engine

    overrides = [*TINY, "parallel.zero_stage=1", "train.global_batch_size=4"]
    cfg = load_config(None, [*SHORT, *overrides])
    built = build_engine(cfg, one_rank)
    batch = next(random_lm_batches(cfg.model.vocab_size, 1, seed=0, rows=2, seq_len=16))
    built.engine.backward(built.engine(batch.tokens, batch.labels))  # the first of two micro-batches
    between = sum(p.grad.untyped_storage().nbytes() for p in built.model.parameters() if p.grad is not None)
    assert between == planned_state(overrides, 1, 0, 0)["accumulated_grads"]


def _ranks(cases: list[tuple[int, int, list[str]]]) -> list[dict]:
    """Every (tp, pp, overrides) case on this rank of a 2-rank job: the rank's coordinates and measured bytes, and
    under TP what a block of this rank's heads and MLP share keeps per token."""
    from models.parallel import TensorParallel
    from pretrain.train.distributed import init_distributed

    out = []
    for tp, pp, overrides in cases:
        cfg = load_config(None, [*SHORT, f"parallel.tp={tp}", f"parallel.pp={pp}", *overrides])
        topo = init_distributed(tp, pp)
        got = engine_state(cfg, topo)
        if tp > 1:
            got["block_saved"] = per_token_saved(Llama(cfg.model, TensorParallel.from_parallel_state()), 0,
                                                 torch.float32)
        out.append({"tp_rank": topo.tp_rank, "pp_rank": topo.pp_rank, "dp_rank": topo.dp_rank, **got})
    return out


TWO_RANKS = [  # (tp, pp, overrides)
    (1, 1, [*SMALL, "parallel.zero_stage=1", "train.precision=bf16", "train.global_batch_size=4"]),  # dp 2
    (2, 1, [*SMALL, "parallel.zero_stage=1"]),
    (1, 2, [*TINY, "parallel.zero_stage=1", "train.precision=bf16", "train.global_batch_size=4"]),
]
MORE_TWO_RANKS = [
    (1, 1, [*TINY, "parallel.zero_stage=2", "train.global_batch_size=4"]),
    (1, 1, [*SMALL, "parallel.zero_stage=2", "train.precision=bf16", "train.global_batch_size=8"]),
    (1, 2, [*SMALL, "train.precision=bf16", "train.global_batch_size=4"]),  # no ZeRO: DeepSpeed's bf16 optimizer
    (2, 1, [*TINY, "parallel.zero_stage=2", "train.precision=bf16"]),
]


def check_two_ranks(cases) -> None:
    results = run_distributed_test(_ranks, world_size=2, args=(cases,), timeout=600)
    for rank in results:
        for (tp, pp, overrides), got in zip(cases, rank):
            full = [f"parallel.tp={tp}", f"parallel.pp={pp}", *overrides]
            check_state(got, full, 2, got["pp_rank"], got["dp_rank"])
            if tp > 1:
                cfg = load_config(None, [*SHORT, *full])
                assert got["block_saved"] == block_activations(Llama.meta(cfg.model).blocks[0], cfg.model, 4, tp)


@pytest.mark.processes
def test_weights_gradients_and_adam_are_the_engines_under_dp_tp_and_pp():
    check_two_ranks(TWO_RANKS)


@pytest.mark.slow
def test_more_layouts_on_two_ranks():
    check_two_ranks(MORE_TWO_RANKS)


# ------------------------------------------------------------------------------------------- the command


def run_plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain", "plan", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_json_keys_and_the_text(capsys):
    args = ["1b", "data.seq_len=2048", "model.max_seq_len=2048", "train.precision=bf16", "parallel.zero_stage=1",
            "train.micro_batch_size=8", "train.global_batch_size=64", "--gpu", "h100-sxm", "--gpus", "8"]
    assert main(["plan", *args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("memory_gib_per_gpu", "fits", "flops_per_token", "tokens_per_s", "memory_breakdown_gib", "layout",
                "assumptions", "gpu"):
        assert key in out
    parts = out["memory_breakdown_gib"]
    assert set(parts) >= {"params", "grads", "optimizer", "activations", "logits_loss", "reserve"}
    assert out["memory_gib_per_gpu"] == pytest.approx(sum(parts.values()))
    assert out["layout"]["dp"] == 8 and out["layout"]["grad_accumulation"] == 1 and out["fits"] is True
    cfg = load_config(None, ["model.preset=1b"])
    assert out["flops_per_token"] == Llama.meta(cfg.model).flops_per_token(2048)  # the training logs' MFU formula
    assert out["tokens_per_s"] == pytest.approx(8 * 989e12 * 0.4 / out["flops_per_token"])
    assert main(["plan", *args]) == 0
    text = capsys.readouterr().out
    assert "H100 SXM" in text and "fits in" in text and "tokens/s" in text and "runtime reserve" in text


def test_a_config_file_and_a_layout_that_does_not_fit(capsys):
    assert main(["plan", os.path.join(REPO, "configs", "paper", "1b_pre_ln.yaml"), "train.precision=fp32",
                 "parallel.zero_stage=0", "train.micro_batch_size=64", "train.global_batch_size=64", "--gpu", "A100",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is False and out["gpu"]["name"] == "A100 80GB"


@pytest.mark.parametrize("args, error", [
    (["tiny", "--gpu", "H300"], "error: unknown GPU 'H300'; known: H100 PCIe, "),
    (["tiny", "train.lr=fast", "--gpu", "H100"], "error: train.lr"),
    (["no/such.yaml", "--gpu", "H100"], "error: config file no/such.yaml does not exist"),
    (["tiny", "parallel.tp=2", "--gpu", "H100", "--gpus", "3"],
     "error: --gpus 3 is not divisible by parallel.tp * parallel.pp = 2"),
    (["tiny", "parallel.zero_stage=3", "--gpu", "H100"], "error: parallel.zero_stage=3 is not supported"),
    (["tiny", "parallel.tp=3", "--gpu", "H100", "--gpus", "3"], "error: model.vocab_size=2048 is not divisible by"),
    (["tiny", "train.global_batch_size=16", "train.micro_batch_size=16", "--gpu", "H100", "--gpus", "2"],
     "error: train.global_batch_size=16 is not divisible by train.micro_batch_size * data-parallel size = 16 * 2"),
])
def test_one_line_errors(args, error, capsys):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(error) and err.count("\n") == 1, err


@pytest.mark.processes
def test_bad_overrides_read_as_pretrain_trains():
    """The same config error, word for word, from `pretrain train` and `pretrain plan`."""
    bad = ["configs/tiny.yaml", "train.precision=fp16"]
    train = subprocess.run([sys.executable, "-m", "pretrain", "train", *bad], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    planned = run_plan(*bad, "--gpu", "H100")
    assert train.returncode == planned.returncode == 2
    assert planned.stderr == train.stderr and planned.stderr.startswith("error: train.precision")


def test_plan_refuses_residual_streams_in_one_line():
    from pretrain.errors import UserError

    with pytest.raises(UserError, match=r"^pretrain plan does not count the activations of model\.residual=mhc"):
        plan(load_config(None, ["model.residual=mhc"]), find("H100"))
