"""`pretrain eval-sft --checkpoint PATH --data FILE.jsonl`: response-token loss and greedy exact match on instruction
data (the model and prompt rules are generate's: pretrain/analysis/generation.py).

For each record of --data (any prepare-sft format): the response-token loss, i.e. the sum of the next-token losses
over the tokens prepare-sft trains (every response and its EOS) divided by their number, teacher-forced in float64
over the whole file; and the exact match of the greedy completion of the prompt before the last response against
that response (both stripped of surrounding whitespace). A completion is cut at 2 x the reference's tokens + 16 new
tokens unless --max-new-tokens is given.
"""

from __future__ import annotations

import json
import math
import sys

from pretrain.cli.arguments import add_generation_args, check_counts
from pretrain.errors import UserError
from pretrain.files import atomic_writer


def register(sub) -> None:
    p = sub.add_parser("eval-sft", help="response-token loss and greedy exact match of a checkpoint on instruction data")
    p.add_argument("--checkpoint", required=True, help="as for generate")
    p.add_argument("--data", required=True, metavar="FILE.jsonl",
                   help="instruction records (any prepare-sft format), e.g. bundled:tiny-instruct-test")
    add_generation_args(p, template_help="prompt template the model was fine-tuned with (default: default)")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="cut completions at N tokens (default: 2 x the reference's tokens + 16)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N records")
    p.add_argument("--group-by", default=None, metavar="FIELD",
                   help="also report loss and exact match per value of this record field (e.g. task)")
    p.add_argument("--predictions", default=None, metavar="FILE.jsonl",
                   help="also write each record's prompt, reference and completion here")
    p.set_defaults(func=run)


def run(args) -> int:
    # the command's libraries (torch and up) load when it runs, so that `pretrain --help` starts without them
    from models.generate import Sampling, generate
    from pretrain.analysis.generation import (batched, check_prompt_lengths, load_generation_model,
                                              read_conversations, render_prompts, response_loss)
    from pretrain.data.sft_format import encode_conversations, get_template
    from pretrain.state.sources import open_source

    check_counts(args, "max-new-tokens", "batch-size", "limit")
    template = get_template(args.template)
    model, tok = load_generation_model(open_source(args.checkpoint, "--checkpoint"), args.tokenizer, args.device)
    pairs = read_conversations(args.data, args.format, need_response=True, limit=args.limit)
    records, convs = [r for r, _ in pairs], [c for _, c in pairs]
    if args.group_by and any(args.group_by not in r for r in records):
        raise UserError(f"--group-by {args.group_by}: not a field of every record of {args.data}")
    examples = encode_conversations(tok, template, convs)
    limit = model.cfg.max_seq_len
    for i, (ids, _) in enumerate(examples, start=1):
        if len(ids) - 1 > limit:
            raise UserError(f"{args.data} record {i}: {len(ids)} tokens, longer than the model's max_seq_len={limit}")
    sums, counts = response_loss(model, examples, args.batch_size)
    prompts = render_prompts(tok, template, convs)
    check_prompt_lengths(prompts, limit, True)
    references = [c.turns[-1].response for c in convs]
    caps = [args.max_new_tokens or 2 * len(tok.encode(ref)) + 16 for ref in references]
    sampling = Sampling(max(caps))
    completions = []
    for start, chunk in batched(prompts, args.batch_size):
        completions += [tok.decode(ids) for ids in generate(model, chunk, tok.eos_id, sampling,
                                                            max_new_tokens=caps[start:start + len(chunk)])]
    hits = [c.strip() == r.strip() for c, r in zip(completions, references)]

    def summary(idx: list[int]) -> dict:
        n_tok = sum(counts[i] for i in idx)
        loss = sum(sums[i] for i in idx) / n_tok if n_tok else math.nan
        return {"examples": len(idx), "response_tokens": n_tok, "loss": loss,
                "exact_match": sum(hits[i] for i in idx) / len(idx), "exact_matches": sum(hits[i] for i in idx)}

    result = {"checkpoint": args.checkpoint, "data": args.data, "template": template.name,
              **summary(list(range(len(records))))}
    if args.group_by:
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            groups.setdefault(str(r[args.group_by]), []).append(i)
        result["groups"] = {k: summary(v) for k, v in sorted(groups.items())}
    if args.predictions:
        with atomic_writer(args.predictions, "w") as f:  # UTF-8
            for r, c, ref, hit in zip(records, completions, references, hits):
                f.write(json.dumps({"record": r, "reference": ref, "completion": c, "exact_match": hit},
                                   ensure_ascii=False) + "\n")
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0
