"""Whole `data prepare` throughput, the datasets-map pipeline before issue 28 against today's, in one run:

    python benchmarks/bench_prepare.py [--mb 100] [--cores 2] [--baseline 755b8c4] [--corpus FILE] [--profile]

Builds a corpus of about `--mb` MB in a temp folder (the bundled text repeated, its lines shuffled each time), or
takes `--corpus FILE` (e.g. distinct text, which a word cache does not flatter: the Vim docs concatenated), trains
nothing (the bundled corpus's tokenizer), then times `prepare_dataset` end to end (num_proc = cores) with the old
code (pretrain/data/prepare.py of the `--baseline` commit, read with git show), `--backend sentencepiece` without
and with its word cache (the default) and `--backend tokenizers`; prints MB/s, CPU seconds (this process and its
children: a fairer figure on a shared machine), the ratios to the old code, and checks that all wrote the same
train.bin and val.bin. `--cores N` pins this process (and its workers) to N cores. `--profile` prints the top of a
cProfile of the word-cache run.
"""

from __future__ import annotations

import argparse
import cProfile
import filecmp
import importlib.util
import os
import pstats
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import datasets  # noqa: E402  (imported up front so its import time is billed to no variant)

from pretrain.data import prepare as prepare_module  # noqa: E402
from pretrain.data.backends import encoder  # noqa: E402
from pretrain.data.prepare import prepare_dataset  # noqa: E402
from pretrain.data.resolve import corpus_path, resolve_tokenizer  # noqa: E402


def make_corpus(path: Path, mb: float, seed: int = 0) -> None:
    """The bundled text repeated until `mb` MB, its lines shuffled in each copy (paragraphs vary in length)."""
    lines = Path(corpus_path("bundled:tinyshakespeare")).read_text(encoding="utf-8").split("\n")
    rng, size = random.Random(seed), 0
    with open(path, "w", encoding="utf-8") as f:
        while size < mb * 1e6:
            rng.shuffle(lines)
            chunk = "\n".join(lines) + "\n"
            f.write(chunk)
            size += len(chunk.encode("utf-8"))


def old_prepare(baseline: str):
    """`prepare_dataset` of the `baseline` commit, loaded from git as a module beside today's."""
    code = subprocess.run(["git", "-C", str(REPO), "show", f"{baseline}:pretrain/data/prepare.py"],
                          check=True, capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("pretrain.data._prepare_baseline", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(code, f"{baseline}:pretrain/data/prepare.py", "exec"), module.__dict__)
    return module.prepare_dataset


def plain_sentencepiece(*args, **kwargs):
    """`--backend sentencepiece` without its word cache: sentencepiece's batched encode of whole documents."""
    prepare_module.encoder = lambda *a, **k: encoder(*a, **k, cache=False)
    try:
        return prepare_dataset(*args, backend="sentencepiece", **kwargs)
    finally:
        prepare_module.encoder = encoder


def cpu_seconds() -> float:
    """CPU seconds of this process and its waited-for children (datasets.map's and the word cache's workers)."""
    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=100.0, help="corpus size in MB (default 100)")
    ap.add_argument("--corpus", help="a text file to prepare instead of the repeated bundled text")
    ap.add_argument("--cores", type=int, default=2, help="cores to pin to and num_proc (default 2)")
    ap.add_argument("--baseline", default="755b8c4", help="commit whose prepare.py is the old path (default 755b8c4)")
    ap.add_argument("--skip-old", action="store_true", help="time only the new paths")
    ap.add_argument("--only-cache", action="store_true", help="time only the old path and the word cache")
    ap.add_argument("--profile", action="store_true", help="cProfile the word-cache run")
    args = ap.parse_args()
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cores])
    datasets.disable_progress_bars()
    tok = resolve_tokenizer("bundled:tinyshakespeare")
    print(f"cores {len(os.sched_getaffinity(0))} (num_proc {args.cores}), load average "
          f"{os.getloadavg()[0]:.1f}, datasets {datasets.__version__}")
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        tmp = Path(tmp)
        corpus = Path(args.corpus) if args.corpus else tmp / "corpus.txt"
        if not args.corpus:
            make_corpus(corpus, args.mb)
        mb = corpus.stat().st_size / 1e6
        variants = {} if args.skip_old else {"old (datasets map)": old_prepare(args.baseline)}
        if not args.only_cache:
            variants["new sentencepiece, no cache"] = plain_sentencepiece
        variants["new sentencepiece (default)"] = lambda *a, **k: prepare_dataset(*a, backend="sentencepiece", **k)
        if not args.only_cache:
            variants["new --backend tokenizers"] = lambda *a, **k: prepare_dataset(*a, backend="tokenizers", **k)
        rates, outs = {}, {}
        for i, (name, prepare) in enumerate(variants.items()):
            out = str(tmp / f"out{i}")
            profile = cProfile.Profile() if args.profile and "default" in name else None
            t0, c0 = time.perf_counter(), cpu_seconds()
            if profile:
                profile.enable()
            kwargs = {} if name.startswith("old") else {"progress": False}
            prepare(str(corpus), tok, out, num_proc=args.cores, **kwargs)
            dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            if profile:
                profile.disable()
                pstats.Stats(profile).sort_stats("cumulative").print_stats(20)
            rates[name], outs[name] = mb / dt, out
            print(f"{name:<30} {mb:7.1f} MB in {dt:6.1f} s = {mb / dt:6.2f} MB/s, {cpu:6.1f} CPU s "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
        first = next(iter(outs.values()))
        same = all(filecmp.cmp(f"{first}/{s}.bin", f"{o}/{s}.bin", shallow=False)
                   for o in outs.values() for s in ("train", "val"))
        print(f"train.bin and val.bin identical across variants: {same}")
        old = rates.get("old (datasets map)")
        if old:
            for name, rate in rates.items():
                if not name.startswith("old"):
                    print(f"ratio {name} / old: {rate / old:.2f}x")


if __name__ == "__main__":
    main()
