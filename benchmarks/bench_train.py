"""Step time of the DeepSpeed training path against a plain PyTorch loop, tiny preset, CPU, same process.

    python benchmarks/bench_train.py [--steps 20] [--seq-len 128] [--batch 16]

Both variants run the same model, batch, AdamW, schedule and clipping; timings are interleaved (A B A B ...)
so background load hits both alike, and the median is reported. Prints the ratio DeepSpeed / plain
(1.00 = no overhead).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from models import Llama  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.data.batches import LMBatch  # noqa: E402
from pretrain.train.distributed import init_distributed, shutdown  # noqa: E402
from pretrain.train.engine import build_engine, lr_lambda  # noqa: E402
from pretrain.config.param_groups import param_groups  # noqa: E402
from pretrain.train.steps import train_step  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    cfg = load_config("configs/tiny.yaml", [f"data.seq_len={args.seq_len}", f"train.global_batch_size={args.batch}",
                                            f"train.micro_batch_size={args.batch}"])
    topo = init_distributed(1, 1)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq_len + 1), generator=gen)
    tokens, labels = data[:, :-1], data[:, 1:]

    built = build_engine(cfg, topo)
    batches = Repeat(LMBatch(tokens, labels))

    plain = Llama(cfg.model, seed=cfg.train.seed)
    opt = torch.optim.AdamW(param_groups(plain, cfg), lr=cfg.train.lr, betas=tuple(cfg.train.betas), eps=cfg.train.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))

    def plain_step():
        loss = plain(tokens, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), cfg.train.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def deepspeed_step():
        return train_step(built, batches, topo).item()  # as plain_step: the step finished, its loss read

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    for _ in range(3):  # warm-up
        plain_step(), deepspeed_step()
    t_plain, t_ds = [], []
    for _ in range(args.steps):
        t_plain.append(timed(plain_step))
        t_ds.append(timed(deepspeed_step))
    shutdown()
    p, d = statistics.median(t_plain), statistics.median(t_ds)
    print(f"tiny preset, CPU ({torch.get_num_threads()} threads), batch {args.batch} x seq {args.seq_len}, "
          f"median of {args.steps} interleaved steps")
    print(f"plain PyTorch loop : {1000 * p:8.1f} ms/step")
    print(f"DeepSpeed engine   : {1000 * d:8.1f} ms/step")
    print(f"ratio DeepSpeed / plain = {d / p:.3f}")



class Repeat:
    """The same pretraining micro-batch forever (a loader of pretrain/data/batches.py's protocol)."""

    token_weighted = False

    def __init__(self, batch):
        self.batch = batch

    def __next__(self):
        return self.batch


if __name__ == "__main__":
    main()
