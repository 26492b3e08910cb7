"""`pretrain generate`: sample completions of prompts from a checkpoint (`pretrain eval-sft` shares its model and
prompt rules: pretrain/analysis/generation.py).

Models: a training checkpoint (step folder, checkpoints/ or run folder, any TP/PP layout, read into one full model)
or a Hugging Face Llama, Qwen3 or OLMo 2 directory, through `pretrain.state.sources.open_source`; one process, CPU or GPU
(`--device`). The tokenizer is the one of the checkpoint's training data (its data.paths[0]), the
`tokenizer.model` of an HF directory, or `--tokenizer`.

Prompts: a fine-tuned run's prompts are rendered in the template its SFT data was prepared with, exactly as
`pretrain data prepare-sft` renders them (`pretrain.data.sft_format`: BOS, the template's prompt text); a pretrained
model or an HF directory continues the text plainly (BOS, then the text), as transformers' text-generation pipeline
does on its export. `--template NAME` and `--raw` choose otherwise; one line on stderr says which applies. Generation: models/generate.py
(KV cache, greedy by default, stops at EOS).
"""

from __future__ import annotations

import json

import sys

from pretrain.cli.arguments import add_generation_args, check_counts
from pretrain.data.sft_format import TEMPLATES, Conversation, Turn, get_template
from pretrain.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("generate", help="sample completions of prompts from a checkpoint or HF directory (KV cache)")
    p.add_argument("--checkpoint", required=True,
                   help="a run folder, checkpoints/ folder or step folder (any TP/PP layout), or a Hugging Face "
                        "directory")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="one prompt, rendered as prepare-sft renders an instruction without input")
    what.add_argument("--prompts", metavar="FILE.jsonl",
                      help="records in any prepare-sft format (the response is not needed); one completion per line")
    add_generation_args(p, template=None,
                        template_help=f"wrap the prompt as an instruction in this template ({', '.join(TEMPLATES)}); "
                                      "default: the template the run was fine-tuned with, none (plain continuation) "
                                      "for a pretrained model or an HF directory")
    p.add_argument("--raw", action="store_true", help="send the text as it is (after BOS), without a template, even "
                                                      "to a fine-tuned model")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="at most N new tokens (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default 1.0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    p.set_defaults(func=run)


def prompt_template(source, name: str | None, raw: bool):
    """The template prompts are rendered in, said in one line on stderr (stdout holds only completions)."""
    if raw:
        why = "--raw"
    elif name:
        why = "--template"
    else:
        name = source.sft_template_name()
        why = "the run was fine-tuned with it; --raw for plain text" if name else \
            ("a Hugging Face directory" if source.is_hf else "a pretrained model") + \
            "; --template NAME wraps the prompt as an instruction"
    template = get_template(name) if name else TEMPLATES["none"]
    what = f"the {template.name} template" if name else "plain continuation"
    print(f"generate: {what} ({why})", file=sys.stderr, flush=True)
    return template


def run(args) -> int:
    # the command's libraries (torch and up) load when it runs, so that `pretrain --help` starts without them
    from models.generate import Sampling, generate
    from pretrain.analysis.generation import (batched, check_prompt_lengths, load_generation_model,
                                              read_conversations, render_prompts)
    from pretrain.state.sources import open_source

    check_counts(args, "max-new-tokens", "batch-size")
    try:
        sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    except ValueError as e:
        raise UserError(f"generate: {e}") from None
    if args.raw and args.template:
        raise UserError("--raw sends the prompt without a template and --template names one; give one of them")
    source = open_source(args.checkpoint, "--checkpoint")
    template = prompt_template(source, args.template, args.raw)
    model, tok = load_generation_model(source, args.tokenizer, args.device)
    if args.prompt is not None:
        convs = [Conversation([Turn(args.prompt)])]
    else:
        convs = [conv for _, conv in read_conversations(args.prompts, args.format, need_response=False)]
    prompts = render_prompts(tok, template, convs)
    check_prompt_lengths(prompts, model.cfg.max_seq_len, args.prompt is None)
    for start, chunk in batched(prompts, args.batch_size):
        for ids in generate(model, chunk, tok.eos_id, sampling, first_index=start):
            text = tok.decode(ids)
            # one line per prompt for a file: newlines and backslashes escaped as in JSON
            print(text if args.prompt is not None else json.dumps(text, ensure_ascii=False)[1:-1], flush=True)
    return 0
