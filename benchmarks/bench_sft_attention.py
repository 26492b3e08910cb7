"""Packed-sequence attention on CPU: which document mask is fastest, and what packing costs the model.

    python benchmarks/bench_sft_attention.py [--repeats 15] [--warmup 3] [--threads 1]

1. Attention forward + backward alone (the tiny preset's heads: H 4, kv 2, E 32; batch 16 x 128 positions
   holding examples of 20-60 positions, as the bundled tiny-instruct set packs), each exact variant against
   plain causal SDPA (`is_causal`, what pretraining runs, which is *not* exact for packed rows):
     bool mask      SDPA with a boolean [B, 1, T, T] block-diagonal causal mask (what models/llama.py uses)
     float mask     SDPA with an additive 0 / -inf mask
     per example    SDPA is_causal on every example separately (varlen by a Python loop)
     flex           torch flex_attention with a block mask (reported as unsupported where it is)
     nested         SDPA on nested jagged tensors, one example each (reported as unsupported where it is)
2. The tiny model's forward + backward on the same batch: packed (positions + document mask) against the same
   tokens unpacked (is_causal): the whole-model price of exact packing.
3. The pretraining path after the packing change against a copy of the attention forward before it (the
   `is_causal` path must cost the same).
4. Whole training steps through the DeepSpeed engine (`pretrain.train.steps.train_step`, tiny preset, 16 x 128, one
   rank): SFT on packed rows of bundled:tiny-instruct (token-weighted loss, positions, document mask, batches
   built from the examples) against pretraining on bundled:tinyshakespeare; positions/s and, for SFT, trained
   tokens/s. Bundled data is prepared into $PRETRAIN_CACHE (or ~/.cache/pretrain) on first use.
Variants are interleaved, first one rotating, median of the repeats; ratios < 1 are faster than the reference.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
logging.getLogger("torch.nested").setLevel(logging.ERROR)  # its "no kernel" explanations: reported below instead

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models.config import ModelConfig  # noqa: E402
from models.llama import Attention, Llama, apply_rope, document_mask  # noqa: E402


def packed_layout(B: int, T: int, seed: int = 0, low: int = 20, high: int = 60) -> torch.Tensor:
    """doc_ids [B, T]: examples of low..high positions back to back, the rest of a row one padding block."""
    g = torch.Generator().manual_seed(seed)
    docs = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        t, d = 0, 0
        while True:
            n = int(torch.randint(low, high + 1, (1,), generator=g))
            if t + n > T:
                break
            docs[b, t:t + n] = d
            t, d = t + n, d + 1
        docs[b, t:] = d
    return docs


def positions_of(docs: torch.Tensor) -> torch.Tensor:
    pos = torch.zeros_like(docs)
    for b in range(docs.shape[0]):
        for t in range(1, docs.shape[1]):
            pos[b, t] = 0 if docs[b, t] != docs[b, t - 1] else pos[b, t - 1] + 1
    return pos


def run(variants: dict, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each variant, interleaved with a rotating first one."""
    names = list(variants)
    for _ in range(warmup):
        for n in names:
            variants[n]()
    times = {n: [] for n in names}
    for i in range(repeats):
        for n in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            variants[n]()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def report(title: str, medians: dict[str, float], reference: str, failed: dict[str, str]) -> None:
    print(f"\n{title}")
    ref = medians[reference]
    for n, t in medians.items():
        print(f"  {n:<28} {1e3 * t:8.2f} ms   ratio {t / ref:5.2f}")
    for n, why in failed.items():
        print(f"  {n:<28} unsupported here: {why}")


def attention_only(repeats: int, warmup: int) -> None:
    B, H, K, T, E = 16, 4, 2, 128, 32
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, E, generator=g, requires_grad=True)
    k = torch.randn(B, K, T, E, generator=g, requires_grad=True)
    v = torch.randn(B, K, T, E, generator=g, requires_grad=True)
    docs = packed_layout(B, T)
    mask = document_mask(docs)
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    segments = [[(int(s), int(e)) for s, e in zip(*_bounds(docs[b]))] for b in range(B)]

    def fb(y):
        y.sum().backward()
        for t in (q, k, v):
            t.grad = None

    def loop():
        rows = []
        for b in range(B):
            rows.append(torch.cat([F.scaled_dot_product_attention(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e],
                                                                  is_causal=True, enable_gqa=True)
                                   for s, e in segments[b]], dim=2))
        return torch.cat(rows)

    variants = {
        "is_causal (not exact)": lambda: fb(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)),
        "bool mask": lambda: fb(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)),
        "float mask": lambda: fb(F.scaled_dot_product_attention(q, k, v, attn_mask=additive, enable_gqa=True)),
        "per example": lambda: fb(loop()),
    }
    # all exact variants agree
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert torch.allclose(loop(), ref, atol=1e-5)
    failed = {}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block = create_block_mask(lambda b, h, i, j: (docs[b, i] == docs[b, j]) & (j <= i), B, None, T, T, device="cpu")
        fb(flex_attention(q, k, v, block_mask=block, enable_gqa=True))
        variants["flex"] = lambda: fb(flex_attention(q, k, v, block_mask=block, enable_gqa=True))
    except Exception as e:  # noqa: BLE001 - report why
        failed["flex"] = f"{type(e).__name__}: {str(e).splitlines()[0][:110]}"
    try:
        def nested():
            parts = [(b, s, e) for b in range(B) for s, e in segments[b]]
            nt = lambda x, rep: torch.nested.as_nested_tensor(  # noqa: E731
                [x[b, :, s:e].repeat_interleave(rep, 0).transpose(0, 1) for b, s, e in parts], layout=torch.jagged
            ).transpose(1, 2)
            y = F.scaled_dot_product_attention(nt(q, 1), nt(k, H // K), nt(v, H // K), is_causal=True)
            fb(y.transpose(1, 2).values())

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nested()
        variants["nested"] = nested
    except Exception as e:  # noqa: BLE001
        failed["nested"] = f"{type(e).__name__}: {str(e).splitlines()[0][:110]}"
    report(f"1. attention fwd+bwd, B{B} H{H}/kv{K} T{T} E{E}, {docs.max(dim=1).values.float().mean():.1f} examples/row",
           run(variants, repeats, warmup), "is_causal (not exact)", failed)


def _bounds(row: torch.Tensor):
    change = [0] + [t for t in range(1, len(row)) if row[t] != row[t - 1]] + [len(row)]
    return change[:-1], change[1:]


def model_step(repeats: int, warmup: int) -> None:
    cfg = ModelConfig.from_preset("tiny")
    model = Llama(cfg, seed=0).train()
    B, T = 16, 128
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    docs = packed_layout(B, T)
    pos = positions_of(docs)

    def step(**kw):
        model.zero_grad(set_to_none=True)
        model(x, y, **kw).backward()

    medians = run({"unpacked (is_causal)": step, "packed (positions + mask)": lambda: step(positions=pos, doc_ids=docs)},
                  repeats, warmup)
    report(f"2. tiny model fwd+bwd, batch {B} x {T}", medians, "unpacked (is_causal)", {})


def _attention_before(self, x, cos, sin, positions=None, mask=None, cache=None):
    """Attention.forward as it was before packing (the reference of the pretraining path)."""
    assert positions is None and mask is None and cache is None
    B, T, _ = x.shape
    qkv = self.qkv(x).view(B, T, self.n_kv_local, self.q_per_kv + 2, self.head_dim)
    q, k, v = qkv.split([self.q_per_kv, 1, 1], dim=3)
    q = q.reshape(B, T, -1, self.head_dim).transpose(1, 2)
    k, v = k.squeeze(3).transpose(1, 2), v.squeeze(3).transpose(1, 2)
    cos, sin = cos[:T].to(q.dtype), sin[:T].to(q.dtype)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.gqa)
    return self.o(y.transpose(1, 2).reshape(B, T, -1))


def pretraining_path(repeats: int, warmup: int) -> None:
    cfg = ModelConfig.from_preset("tiny")
    now, before = Llama(cfg, seed=0).train(), Llama(cfg, seed=0).train()
    for m in before.modules():
        if isinstance(m, Attention):
            m.forward = _attention_before.__get__(m)
    B, T = 16, 128
    tokens = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(2))
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def step(model):
        model.zero_grad(set_to_none=True)
        loss = model(x, y)
        loss.backward()
        return loss

    assert torch.equal(step(now), step(before)), "the pretraining path must give bitwise the same loss"
    report(f"3. pretraining path, tiny model fwd+bwd, batch {B} x {T}",
           run({"before packing": lambda: step(before), "now": lambda: step(now)}, repeats, warmup), "before packing", {})


def engine_steps(repeats: int, warmup: int) -> None:
    from pretrain.config import load_config
    from pretrain.data.loader import DataLoader, TokenDataset
    from pretrain.data.resolve import resolve_data_path
    from pretrain.data.sft_loader import SFTDataset, SFTLoader, SFTSamples
    from pretrain.train.distributed import init_distributed, shutdown
    from pretrain.train.engine import build_engine
    from pretrain.train.steps import train_step

    B, T = 16, 128
    common = ["data.seq_len=128", f"train.global_batch_size={B}", f"train.micro_batch_size={B}"]
    topo = init_distributed(1, 1)
    try:
        pre = build_engine(load_config("configs/tiny.yaml", common), topo)
        sft = build_engine(load_config("configs/tiny.yaml", common), topo)
        pre_data = DataLoader(TokenDataset(resolve_data_path("bundled:tinyshakespeare"), T), B)
        sft_data = SFTLoader(SFTSamples(SFTDataset(resolve_data_path("bundled:tiny-instruct"), "train"), T), B)
        medians = run({"pretraining": lambda: train_step(pre, pre_data, topo), "SFT (packed)": lambda: train_step(sft, sft_data, topo)},
                      repeats, warmup)
        report(f"4. training step through the engine, tiny preset, batch {B} x {T}", medians, "pretraining", {})
        samples = sft_data.dataset
        groups = samples.groups(np.arange(20 * B), (0,))
        real = sum(int(samples.positions[g].sum()) for g in groups) / (20 * B * T)
        per_step = sum(int(samples.dataset.example(e)[1][1:].sum()) for g in groups for e in g.tolist()) / 20
        print(f"  positions/s: pretraining {B * T / medians['pretraining']:,.0f}, SFT {B * T / medians['SFT (packed)']:,.0f}; "
              f"SFT rows hold {100 * real:.1f}% example positions (the rest padding), "
              f"{per_step:.0f} trained tokens a step = {per_step / medians['SFT (packed)']:,.0f} trained tokens/s")
    finally:
        shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU")
    attention_only(args.repeats, args.warmup)
    model_step(args.repeats, args.warmup)
    pretraining_path(args.repeats, args.warmup)
    engine_steps(args.repeats, args.warmup)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
