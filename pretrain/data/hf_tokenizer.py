"""Our sentencepiece tokenizer as Hugging Face tokenizer files, so that `AutoTokenizer.from_pretrained(DIR)` gives
exactly our token ids (`pretrain export-hf` writes them into its export folder beside `models.hf.save_hf`'s files).

Why a tokenizer.json: transformers 5 builds `LlamaTokenizer(Fast)` from a `tokenizer.json` only; given
`tokenizer.model` alone it starts from a three-token vocabulary (unk, bos, eos) and encodes every text to an empty
list. The `tokenizers` pipeline that does what sentencepiece does is built in backends.py (`backend_tokenizer`, which
`data prepare --backend tokenizers` tokenizes with too); it is saved here as tokenizer.json.
The special pieces (pad, unk, bos, eos, as the model has them) are special added tokens. `tokenizer.model` is copied
too, for sentencepiece users. A chat template is the jinja rendering of one of pretrain/data/sft_format.py's TEMPLATES.
"""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.data.backends import backend_tokenizer
from pretrain.data.folders import MODEL_FILE
from pretrain.data.sft_format import Template, Turn
from pretrain.data.tokenizer import Tokenizer

__all__ = ["TOKENIZER_FILES", "backend_tokenizer", "chat_template", "special_tokens", "write_hf_tokenizer"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", MODEL_FILE)


def special_tokens(tok: Tokenizer) -> dict[str, str]:
    """{"bos_token": "<s>", ...} for the special ids the tokenizer has (Llama's has no pad)."""
    ids = {"bos_token": tok.bos_id, "eos_token": tok.eos_id, "unk_token": tok.unk_id, "pad_token": tok.pad_id}
    return {name: tok.sp.id_to_piece(i) for name, i in ids.items() if i >= 0}


def chat_template(template: Template) -> str:
    """A jinja chat template that renders messages ([system], user, assistant, ..., user) as `template` renders the
    conversation: BOS, the head (system message or default) before the first prompt, each user turn's prompt, each
    assistant turn's text followed by EOS. `add_generation_prompt` adds nothing: the prompt text already ends where
    the response starts."""
    mark = "\x00MARK\x00"  # split each rendering around a marker: the jinja holds the template's own strings
    user_before, user_after = template.prompt(Turn(mark)).split(mark)
    head_plain = template.head(None, Turn(mark))
    system = template.head(mark, Turn(mark)).split(mark)
    if mark in head_plain or len(system) != 2 or mark not in template.prompt(Turn(mark)):
        raise ValueError(f"template {template.name}: not of the form head + prefix + user text + suffix")
    q = json.dumps  # a JSON string literal is a jinja string literal
    return (
        "{{ bos_token }}"
        "{% set ns = namespace(head=" + q(head_plain) + ") %}"
        "{% if messages and messages[0]['role'] == 'system' and messages[0]['content'] %}"
        "{% set ns.head = " + q(system[0]) + " + messages[0]['content'] + " + q(system[1]) + " %}{% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}"
        "{% if ns.head is not none %}{{ ns.head }}{% set ns.head = none %}{% endif %}"
        "{{ " + q(user_before) + " + message['content'] + " + q(user_after) + " }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
        "{% elif message['role'] != 'system' or not loop.first %}"
        "{{ raise_exception('roles: an optional system message first, then user and assistant turns') }}"
        "{% endif %}{% endfor %}"
    )


def write_hf_tokenizer(tok: Tokenizer, out_dir: str | Path, model_max_length: int,
                       template: Template | None = None) -> None:
    """Write TOKENIZER_FILES for `tok` into `out_dir` (with `template` as the chat template)."""
    out = Path(out_dir)
    backend_tokenizer(tok).save(str(out / "tokenizer.json"))
    specials = special_tokens(tok)
    config = {
        # the generic class: it loads tokenizer.json as it is (LlamaTokenizer would rebuild its own pipeline)
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": tok.bos_id >= 0,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "left",  # batched generation continues after the last real token
    }
    if template is not None:
        config["chat_template"] = chat_template(template)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n")
    (out / MODEL_FILE).write_bytes(tok.model_bytes)
