"""Bits per byte (pretrain/data/text_bytes.py): the bytes and nats of a small example worked out by hand, and the
bytes of a prepared corpus equal to its text's UTF-8 length exactly under two tokenizers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain.analysis.perplexity import mean_loss
from pretrain.data.batches import IGNORE_INDEX
from pretrain.data.loader import TokenDataset, validation_batches
from pretrain.data.prepare import prepare_dataset
from pretrain.data.resolve import corpus_path
from pretrain.data.sft_loader import SFTDataset, SFTSamples, SFTValidationBatches
from pretrain.data.sft_prepare import prepare_sft
from pretrain.data.text_bytes import TokenBytes, token_bytes
from pretrain.data.tokenizer import Tokenizer, train_tokenizer

# A vocabulary by hand: 0-3 the specials (BOS 2, EOS 3), byte pieces for the emoji 😀 (F0 9F 98 80).
PIECES = ["<pad>", "<unk>", "<s>", "</s>", "<0xF0>", "<0x9F>", "▁the", "▁", "cat", "é", "▁▁", "<0x98>", "<0x80>",
          "Q:", "▁yes"]
BOS, EOS = 2, 3
HAND = TokenBytes.from_pieces(PIECES, empty=[0, 1, 2, 3], byte=[4, 5, 11, 12], boundary=[EOS, BOS])
# Three documents as sentencepiece encodes them (a "▁" before each, not in the text), each followed by EOS:
#   "the cat" -> ▁the ▁ cat       " é" -> ▁▁ é       "😀" -> ▁ <0xF0> <0x9F> <0x98> <0x80>
STREAM = [6, 7, 8, EOS, 10, 9, EOS, 7, 4, 5, 11, 12, EOS]
TEXT_BYTES = len("the cat".encode()) + len(" é".encode()) + len("😀".encode())  # 7 + 3 + 4


def test_bytes_and_bits_per_byte_by_hand():
    assert TEXT_BYTES == 14
    assert HAND.stream(STREAM) == TEXT_BYTES
    # As the loader cuts it: samples of 4 targets, neighbours sharing a token; the first token (▁the: "the", 3
    # bytes at a document's start) is no target.
    tokens = torch.tensor(STREAM)
    samples = torch.stack([tokens[i * 4: i * 4 + 5] for i in range(3)])
    inputs, labels = samples[:, :-1], samples[:, 1:]
    #   targets ▁ cat EOS ▁▁(after EOS: 1 byte, " ")  |  é EOS ▁(after EOS: 0) <0xF0>  |  <0x9F> <0x98> <0x80> EOS
    per_sample = [1 + 3 + 0 + 1, 2 + 0 + 0 + 1, 1 + 1 + 1 + 0]
    assert [HAND.count(inputs[i:i + 1], labels[i:i + 1]) for i in range(3)] == per_sample
    assert HAND.count(inputs, labels) == sum(per_sample) == TEXT_BYTES - 3

    # A model giving each target of the first two samples probability 1/2 (1 bit) and of the third 1/4 (2 bits):
    # 4 + 4 + 8 = 16 bits over 11 bytes.
    def loss_sum(x, y):
        logits = torch.full((*y.shape, len(PIECES)), -math.inf, dtype=torch.float64)
        for b in range(y.shape[0]):
            ways = 4 if bool((x[b] == inputs[2]).all()) else 2
            for t in range(y.shape[1]):
                logits[b, t, [(int(y[b, t]) + k) % len(PIECES) for k in range(ways)]] = 0.0
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")

    val = mean_loss(loss_sum, [(inputs[:2], labels[:2]), (inputs[2:], labels[2:])], torch.device("cpu"), HAND)
    assert (val.tokens, val.bytes) == (12, 11)
    assert val.loss == pytest.approx(16 * math.log(2) / 12, rel=1e-12)  # nats per token
    assert val.bpb == pytest.approx(16 / 11, rel=1e-12)
    assert val.record(7) == {"step": 7, "val_loss": val.loss, "val_ppl": math.exp(val.loss), "val_bpb": val.bpb}
    assert mean_loss(loss_sum, [(inputs, labels)], torch.device("cpu")).bpb is None  # no tokenizer, no bpb

    # Ignored targets count nothing (pipeline padding rows); an SFT example BOS "Q:" "▁yes" EOS trains "▁yes" EOS
    # only: the response, encoded on its own, starts after its masked prompt ("yes", 3 bytes); trained on the
    # prompt too, the response's "▁" is the space between them ("Q: yes", 6 bytes).
    assert HAND.count(inputs, torch.full_like(labels, IGNORE_INDEX)) == 0
    sft = torch.tensor([[BOS, 13, 14]])
    assert HAND.count(sft, torch.tensor([[IGNORE_INDEX, 14, EOS]])) == 3
    assert HAND.count(sft, torch.tensor([[13, 14, EOS]])) == 6


CORPUS = Path(corpus_path("bundled:tinyshakespeare")).read_text(encoding="utf-8")
INSTRUCT = str(Path(corpus_path("bundled:tinyshakespeare")).parent / "tiny_instruct_test.jsonl")
# Documents at the edges of the rules: spaces, tabs and newlines at either end or alone, byte fallback (emoji with
# joiners, scripts outside the training text), control characters, literal specials. Blank ones are dropped by
# prepare. (Not a literal "▁": sentencepiece reads it as a space, losing 2 bytes, in decoding too.)
EDGES = [" leading space", "trailing space ", "  two leading and two trailing  ", " ", "\t", "\n", "a", "x\ny",
         "\n\nnewlines around\n\n", "emoji 🎉🙂👩‍👩‍👧 ❤️ 日本語 Ωμέγα ñ ﬁ \u00a0\u200b\x00\x7f \U0001f9ec", "🙂", " 🙂 ",
         "12345 3.14", "<s> </s> <unk> literal specials", "\r\n windows\r\n", "a\u0301 ǅ \ufeff", "  \t mixed\t \n"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[list[str], dict[str, str]]:
    """The documents (a slice of the bundled corpus by paragraph, and EDGES) prepared with a BPE and a unigram
    tokenizer of different vocabulary sizes, trained as `pretrain tokenizer train` trains them."""
    root = tmp_path_factory.mktemp("bpb")
    (root / "corpus.txt").write_text(CORPUS[:100_000], encoding="utf-8")
    docs = []
    for i, paragraph in enumerate(CORPUS[100_000:140_000].split("\n\n")):
        docs += [paragraph] + ([EDGES[i // 5 % len(EDGES)]] if i % 5 == 0 else [])  # edges in both splits
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs + EDGES), encoding="utf-8")
    folders = {}
    for kind, vocab in (("bpe", 1000), ("unigram", 600)):
        tok = Tokenizer.load(train_tokenizer([str(root / "corpus.txt")], vocab, str(root / f"tok_{kind}"),
                                             model_type=kind))
        folders[kind] = prepare_dataset(str(root / "docs.jsonl"), tok, str(root / kind), val_fraction=0.3,
                                        progress=False)
        folders[f"{kind}_sft"] = prepare_sft(INSTRUCT, tok, str(root / f"{kind}_sft"), val_fraction=0.0)
    return docs + EDGES, folders


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_bytes_of_a_prepared_corpus_are_its_text(prepared, kind):
    docs, folders = prepared
    text_bytes = sum(len(d.encode("utf-8")) for d in docs if d.strip())
    splits = {s: TokenDataset(folders[kind], 16, s) for s in ("train", "val")}
    table = token_bytes(splits["val"].tokenizer_file)
    assert table is not None and len(table.table) == splits["val"].vocab_size
    # every target of each split plus its first token (a document's start, never a target): the documents' text
    assert sum(table.stream(d.tokens) for d in splits.values()) == text_bytes
    # validation as evaluation reads it (samples sharing a token, micro-batches, several data-parallel ranks):
    # the text of the samples' tokens less the first
    val = splits["val"]
    n = len(val)
    covered = val.tokens[: n * 16 + 1]
    want = table.stream(covered) - int(table.first[covered[0]])
    got = sum(table.count(b.tokens, b.labels) for r in range(3)
              for b in validation_batches(val, n * 16, 5, dp_rank=r, dp_size=3, pad=True))
    assert got == want
    assert validation_batches(val, n * 16, 5).token_bytes is table  # one table per tokenizer file and process


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_bytes_of_sft_validation_are_its_responses(prepared, kind):
    """SFT validation counts the trained tokens: each response (encoded on its own after its masked prompt) and its
    EOS, packed into rows; their bytes are the responses' text."""
    _, folders = prepared
    responses = [json.loads(line)["output"] for line in Path(INSTRUCT).read_text(encoding="utf-8").splitlines()]
    rows = SFTSamples(SFTDataset(folders[f"{kind}_sft"], "train"), seq_len=128)
    got = sum(b.token_bytes.count(x.tokens, x.labels) for b in [SFTValidationBatches(rows, len(rows), 4)] for x in b)
    assert got == sum(len(r.encode("utf-8")) for r in responses)


def test_no_tokenizer_no_bytes(tmp_path):
    from pretrain.data.prepare import save_arrays

    path = save_arrays(str(tmp_path / "a"), {"train": np.arange(40), "val": np.arange(40)}, vocab_size=100)
    assert validation_batches(TokenDataset(path, 8, "val"), 32, 2).token_bytes is None
