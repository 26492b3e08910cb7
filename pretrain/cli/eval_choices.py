"""`pretrain eval-choices --checkpoint PATH|HF_DIR --task TASK.yaml|.jsonl [--json]`: zero-shot multiple-choice
accuracy by continuation log-likelihood, scored as lm-eval-harness scores it (pretrain/analysis/choices.py), so a
checkpoint here and its `export-hf` directory under `lm_eval --model hf` give the same acc.

Tasks: lm-eval task YAMLs of the local kind, or a JSONL of context/choices/label (pretrain/data/choice_tasks.py).
Models through `open_source`, as `pretrain eval`: a training checkpoint as our model, an HF directory with
transformers' AutoModelForCausalLM; the tokenizer is always the sentencepiece one (the checkpoint's training data's,
the HF directory's tokenizer.model, or --tokenizer), so this does not depend on the export's tokenizer files.
"""

from __future__ import annotations

import json
import sys


def register(sub) -> None:
    p = sub.add_parser("eval-choices",
                       help="zero-shot multiple-choice accuracy of a checkpoint or HF model, as lm-eval scores it")
    p.add_argument("--checkpoint", required=True,
                   help="a run folder, checkpoints/ folder or step folder (any TP/PP layout), or a Hugging Face "
                        "model directory")
    p.add_argument("--task", required=True, metavar="TASK",
                   help="an lm-eval task .yaml (local json data) or a .jsonl of {context, choices, label}")
    p.add_argument("--tokenizer", default=None, metavar="MODEL",
                   help="tokenizer (default: the checkpoint's training data's, or the HF directory's tokenizer.model)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (acc, acc_norm, items, per-item log-likelihoods) instead of a line")
    p.set_defaults(func=run)


def run(args) -> int:
    # the command's libraries (torch and up) load when it runs, so that `pretrain --help` starts without them
    import torch
    from pretrain.analysis.choices import model_logits, score_task
    from pretrain.data.choice_tasks import load_task
    from pretrain.state.sources import open_source

    task = load_task(args.task)
    source = open_source(args.checkpoint, "--checkpoint")
    tok = source.tokenizer(args.tokenizer)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    logits, max_len = model_logits(source, tok, device)
    result = {**score_task(task, tok, logits, max_len, device), **source.description}
    if args.json:
        json.dump(result, sys.stdout)
        print()
    else:
        print(f"{task.name}: acc {result['acc']:.4f} | acc_norm {result['acc_norm']:.4f} | {result['items']} items | "
              f"{args.checkpoint}")
    return 0
