"""Forward + backward time of our `Llama` against transformers' `LlamaForCausalLM` (same config, same weights).

    python benchmarks/bench_model.py [--repeats 10] [--warmup 3] [--profile]

fp32 on CPU, torch's default thread count. Both models get the same weights (through models/hf/), HF uses
its sdpa attention and no KV cache, and both compute the mean next-token loss over the same T positions:
ours as `model(tokens, labels)`, HF through its `labels` argument with `shift_labels` given explicitly (so
HF does not shift again and drop a position). Steps of the two models are interleaved so that machine noise
hits both alike; the median of the repeats is reported, with the ratio ours / HF (target <= 1.0). On a
shared machine wall times swing with other load: the paired-median, minima and CPU-time ratios printed next
to it are the more robust reading then.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")

import torch  # noqa: E402

from models.config import ModelConfig  # noqa: E402
from models.hf import to_hf_config, to_hf_state_dict  # noqa: E402
from models.llama import Llama  # noqa: E402


@dataclass
class Case:
    name: str
    cfg: ModelConfig
    batch: int
    seq: int


def cases() -> list[Case]:
    return [
        Case("tiny (d128 L8 H4/2 ffn384 V2048)", ModelConfig.from_preset("tiny"), batch=8, seq=256),
        Case(
            "small (d256 L4 H8/4 ffn704 V8192)",
            ModelConfig(vocab_size=8192, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_hidden=704,
                        max_seq_len=256),
            batch=8,
            seq=256,
        ),
    ]


def build_pair(cfg: ModelConfig, seed: int = 0):
    import transformers

    ours = Llama(cfg, seed=seed).train()
    hf_cfg = to_hf_config(cfg)
    hf_cfg._attn_implementation = "sdpa"
    hf_cfg.use_cache = False
    hf = transformers.LlamaForCausalLM(hf_cfg).train()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(cfg, ours.state_dict()), strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if cfg.tie_embeddings else set()), (missing, unexpected)
    return ours, hf


def make_steps(ours, hf, tokens: torch.Tensor):
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def ours_step() -> torch.Tensor:
        ours.zero_grad(set_to_none=True)
        loss = ours(x, y)
        loss.backward()
        return loss

    def hf_step() -> torch.Tensor:
        hf.zero_grad(set_to_none=True)
        loss = hf(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss
        loss.backward()
        return loss

    return ours_step, hf_step


def timed(step) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one step."""
    w0, c0 = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - w0, time.process_time() - c0


def bench(case: Case, repeats: int, warmup: int, profile: bool) -> float:
    ours, hf = build_pair(case.cfg)
    tokens = torch.randint(0, case.cfg.vocab_size, (case.batch, case.seq + 1), generator=torch.Generator().manual_seed(0))
    ours_step, hf_step = make_steps(ours, hf, tokens)

    l_ours, l_hf = ours_step().item(), hf_step().item()
    assert abs(l_ours - l_hf) < 1e-4, f"losses differ: ours {l_ours} vs HF {l_hf}"
    g_ours = ours.blocks[0].mlp.down.weight.grad
    g_hf = hf.model.layers[0].mlp.down_proj.weight.grad
    assert torch.allclose(g_ours, g_hf, atol=1e-6, rtol=1e-3), "gradients differ"

    for _ in range(warmup):
        ours_step(), hf_step()
    t_ours, t_hf = [], []
    for i in range(repeats):  # interleaved, alternating who goes first, so load changes hit both alike
        if i % 2:
            t_hf.append(timed(hf_step)), t_ours.append(timed(ours_step))
        else:
            t_ours.append(timed(ours_step)), t_hf.append(timed(hf_step))
    wall_o, cpu_o = zip(*t_ours)
    wall_h, cpu_h = zip(*t_hf)
    med = statistics.median
    ratio = med(wall_o) / med(wall_h)
    print(f"{case.name}: batch {case.batch} x seq {case.seq}, {ours.num_params() / 1e6:.2f}M params, "
          f"loss ours {l_ours:.5f} / HF {l_hf:.5f}, {repeats} repeats after {warmup} warm-up")
    print(f"  fwd+bwd wall  ours {1e3 * med(wall_o):8.1f} ms (min {1e3 * min(wall_o):7.1f})   "
          f"HF {1e3 * med(wall_h):8.1f} ms (min {1e3 * min(wall_h):7.1f})")
    print(f"  fwd+bwd CPU   ours {1e3 * med(cpu_o):8.1f} ms                 HF {1e3 * med(cpu_h):8.1f} ms")
    print(f"  ratio ours/HF = {ratio:.3f} {'OK (<= 1.0)' if ratio <= 1.0 else 'SLOWER than HF'}  "
          f"[paired median {med(a / b for a, b in zip(wall_o, wall_h)):.3f}, minima {min(wall_o) / min(wall_h):.3f}, "
          f"CPU time {med(cpu_o) / med(cpu_h):.3f}]")
    if profile:
        run_profile("ours", ours_step)
        run_profile("HF", hf_step)
    return ratio


def run_profile(label: str, step, rows: int = 25) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    print(f"\n--- profile: {label} (3 steps, sorted by self CPU time) ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="also print a torch.profiler table per model")
    p.add_argument("--only", default=None, help="run only cases whose name starts with this (tiny, small)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, fp32 CPU")
    ratios = {}
    for case in cases():
        if args.only and not case.name.startswith(args.only):
            continue
        ratios[case.name.split()[0]] = bench(case, args.repeats, args.warmup, args.profile)
    print("summary: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()) + "  (ours/HF, target <= 1.0)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
