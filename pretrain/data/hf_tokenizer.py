"""Our sentencepiece tokenizer as Hugging Face tokenizer files, so that `AutoTokenizer.from_pretrained(DIR)` gives
exactly our token ids (`pretrain export-hf` writes them into its export folder beside `models.hf.save_hf`'s files).

Why a tokenizer.json built here: transformers 5 builds `LlamaTokenizer(Fast)` from a `tokenizer.json` only; given
`tokenizer.model` alone it starts from a three-token vocabulary (unk, bos, eos) and encodes every text to an empty
list. So the sentencepiece model is translated into a `tokenizers` pipeline that does what sentencepiece does:
    normalizer      the model's precompiled character map (none for our identity-normalized tokenizers), then a
                    "▁" prepended (sentencepiece's dummy prefix; always, also before a leading space, unlike
                    `Metaspace`, which skips it when the text starts with a space) and every space turned into "▁"
    model           BPE with every split of every piece into two pieces as a merge, ranked by the piece's score
                    (the order sentencepiece merges in), or Unigram with the pieces' scores; byte fallback on
    post-processor  BOS before every text: `pretrain generate` and SFT examples start with BOS
    decoder         "▁" back to spaces, byte pieces back to bytes, the dummy prefix's space removed
The special pieces (pad, unk, bos, eos, as the model has them) are special added tokens. `tokenizer.model` is copied
too, for sentencepiece users. A chat template is the jinja rendering of one of pretrain/data/sft_format.py's TEMPLATES.
"""

from __future__ import annotations

import json
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Regex, decoders, normalizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE, Unigram

from pretrain.data.folders import MODEL_FILE
from pretrain.data.sft_format import Template, Turn
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import UserError

SPACE = "\u2581"  # sentencepiece's whitespace symbol
# sentencepiece ModelProto.SentencePiece.Type (unused and byte pieces need no handling of their own)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", MODEL_FILE)


def _proto(tok: Tokenizer) -> sentencepiece_model_pb2.ModelProto:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.model_bytes)
    return proto


def special_tokens(tok: Tokenizer) -> dict[str, str]:
    """{"bos_token": "<s>", ...} for the special ids the tokenizer has (Llama's has no pad)."""
    ids = {"bos_token": tok.bos_id, "eos_token": tok.eos_id, "unk_token": tok.unk_id, "pad_token": tok.pad_id}
    return {name: tok.sp.id_to_piece(i) for name, i in ids.items() if i >= 0}


def backend_tokenizer(tok: Tokenizer):
    """The `tokenizers.Tokenizer` that encodes and decodes as `tok` does."""
    proto = _proto(tok)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    user = [piece for piece, _, t in pieces if t == USER_DEFINED]
    if user:  # sentencepiece cuts them out of the text before the model runs, with its own matching rules
        raise UserError(f"{tok.path}: user-defined symbols ({', '.join(user[:3])}), which this export does not "
                        "translate to Hugging Face files; export with a tokenizer without them (--tokenizer)")
    if spec.model_type == 2:  # BPE
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        score = {piece: s for piece, s, t in pieces if t == NORMAL}
        merges = sorted(
            ((piece[:k], piece[k:]) for piece in score for k in range(1, len(piece))
             if piece[:k] in score and piece[k:] in score),
            key=lambda m: (-score[m[0] + m[1]], vocab[m[0] + m[1]], vocab[m[0]]))
        unk = pieces[tok.unk_id][0] if tok.unk_id >= 0 else None
        model = BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=spec.byte_fallback)
    elif spec.model_type == 1:  # unigram
        model = Unigram([(piece, s) for piece, s, _ in pieces], tok.unk_id if tok.unk_id >= 0 else None,
                        byte_fallback=spec.byte_fallback)
    else:
        raise UserError(f"{tok.path}: a sentencepiece {spec.ModelType.Name(spec.model_type)} model, which the "
                        "Hugging Face export cannot express; use a bpe or unigram tokenizer (--tokenizer)")
    hf = HFTokenizer(model)
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:  # sentencepiece trims the text and collapses runs of spaces first
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    steps.append(normalizers.Replace(" ", SPACE))
    hf.normalizer = normalizers.Sequence(steps)
    hf.pre_tokenizer = None
    decode = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        decode.append(decoders.Strip(content=" ", left=1, right=0))
    hf.decoder = decoders.Sequence(decode)
    # Control and unknown pieces are never read from text by sentencepiece; here they are special tokens, which
    # transformers needs for bos_token & co (a literal "<s>" in a text becomes BOS: see docs/interop.md).
    hf.add_special_tokens([AddedToken(piece, special=True, normalized=False)
                           for piece, _, t in pieces if t in (CONTROL, UNKNOWN)])
    if tok.bos_id >= 0:
        bos = pieces[tok.bos_id][0]
        hf.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_id)])
    return hf


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
