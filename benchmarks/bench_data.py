"""Data pipeline throughput next to the tiny model's step time: is the loader ever the bottleneck?

    python benchmarks/bench_data.py [--steps 5] [--batches 500]

Prints tokenization throughput (prepare with num_proc=2 on the bundled corpus, end to end and on an 8x copy
to amortise start-up), loader throughput (samples/s at seq_len 256, micro batch 16; plain and blended), the
forward+backward time of the `tiny` model on that batch, and the ratio loader-time / step-time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets  # noqa: E402  (imported up front so its import time is not billed to tokenization)
import torch  # noqa: E402

from pretrain.data.resolve import corpus_path, resolve_data_path  # noqa: E402
from pretrain.data.loader import BlendedDataset, DataLoader, TokenDataset  # noqa: E402
from pretrain.data.prepare import prepare_dataset  # noqa: E402

SEQ_LEN, MICRO_BATCH = 256, 16


def bench_tokenization(tmp: Path, tokenizer: str) -> None:
    corpus = Path(corpus_path("bundled:tinyshakespeare"))
    big = tmp / "x8.txt"
    big.write_text(corpus.read_text(encoding="utf-8") * 8, encoding="utf-8")
    for label, src in (("bundled corpus", corpus), ("bundled corpus x8", big)):
        mb = src.stat().st_size / 1e6
        t0 = time.perf_counter()
        out = prepare_dataset(str(src), tokenizer, str(tmp / f"prep-{src.stem}"), num_proc=2, sample_by="paragraph")
        dt = time.perf_counter() - t0
        print(f"tokenization  {label:<20} {mb:6.2f} MB in {dt:5.2f} s  = {mb / dt:6.2f} MB/s  (num_proc=2, prepare end to end -> {out})")


def bench_loader(loader: DataLoader, batches: int) -> float:
    """Seconds per micro-batch."""
    for _ in range(10):
        next(loader)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return (time.perf_counter() - t0) / batches


def bench_step(tokens: torch.Tensor, labels: torch.Tensor, steps: int) -> float:
    """Seconds per forward+backward of the tiny model."""
    from models import Llama, ModelConfig

    model = Llama(ModelConfig.from_preset("tiny"))
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        loss = model(tokens, labels)
        loss.backward()
        model.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="model steps to time")
    ap.add_argument("--batches", type=int, default=500, help="loader micro-batches to time")
    args = ap.parse_args()
    datasets.disable_progress_bars()
    print(f"cpus {os.cpu_count()}, torch threads {torch.get_num_threads()}, torch {torch.__version__}, datasets {datasets.__version__}")

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        data = resolve_data_path("bundled:tinyshakespeare", cache_dir=str(tmp / "cache"))
        print(f"bundled build (tokenizer train + prepare, first use): {time.perf_counter() - t0:.2f} s")
        bench_tokenization(tmp, f"{data}/tokenizer.model")

        train, val = TokenDataset(data, SEQ_LEN), TokenDataset(data, SEQ_LEN, split="val")
        loader = DataLoader(train, MICRO_BATCH, seed=0)
        per_batch = bench_loader(loader, args.batches)
        blended = bench_loader(DataLoader(BlendedDataset([train, val], [0.8, 0.2]), MICRO_BATCH, seed=0), args.batches)
        print(f"loader        seq_len {SEQ_LEN}, micro batch {MICRO_BATCH}: {MICRO_BATCH / per_batch:9.0f} samples/s "
              f"({per_batch * 1e3:.3f} ms/batch); blended 2 datasets: {MICRO_BATCH / blended:9.0f} samples/s "
              f"({blended * 1e3:.3f} ms/batch)")

        tokens, labels = next(loader)
        step = bench_step(tokens, labels, args.steps)
        print(f"tiny model    forward+backward on [{MICRO_BATCH}, {SEQ_LEN}]: {step * 1e3:.1f} ms/step "
              f"({MICRO_BATCH / step:.0f} samples/s)")
        print(f"ratio         loader/step = {per_batch / step:.5f} (blended {blended / step:.5f}): "
              f"the loader uses {100 * per_batch / step:.3f}% of a step, never the bottleneck")


if __name__ == "__main__":
    main()
