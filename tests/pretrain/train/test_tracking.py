"""logging.backends (pretrain/train/trackers.py): TensorBoard, W&B (offline) and trackio get every number metrics.jsonl
and layer_stats.jsonl get, at its step, with the resolved config; their files and run ids stay in the run folder, so a
resumed run continues the same tracker runs; a missing package, a bad backend name and the old logging.tensorboard
key are said in one line before anything runs. Real wandb and trackio: the W&B offline run files are read back with
`wandb leet inspect --json`, trackio's local SQLite database directly."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest
import yaml
from helpers.train import REPO, metrics, run_train

from pretrain.cli import main
from pretrain.config import load_config, save_config, to_dict
from pretrain.diagnostics.writer import tracked
from pretrain.errors import UserError
from pretrain.runs import read_layer_stats, read_tracking, write_tracking
from pretrain.state.resume import FREE, key_class, prepare_run
from pretrain.train.metrics import MetricsWriter
from pretrain.train.trackers import TrackioTracker, open_trackers, scalars

ALL = "logging.backends=[tensorboard,wandb,trackio]"
TRACKIO_KEYS = ("_Username", "_Created", "_Group")  # what trackio adds to a run's config


# ---------------------------------------------------------------------------------------------------- reading back


def expected_by_step(run_dir: str) -> dict[int, dict]:
    """{step: {tracker key: value}} from metrics.jsonl and layer_stats.jsonl, as every tracker must hold them."""
    out: dict[int, dict] = {}
    for record in metrics(run_dir):
        prefix = "val" if "val_loss" in record else "train"
        out.setdefault(record["step"], {}).update(scalars(record, prefix))
    for record in read_layer_stats(run_dir):
        out.setdefault(record["step"], {}).update(scalars(tracked(record), "layers"))
    return out


def trackio_rows(run_dir: str, project: str = "normlab") -> tuple[list[tuple], dict]:
    """([(run_id, run_name, step, metrics)], {run_id: config}) from the run's trackio database."""
    with sqlite3.connect(os.path.join(run_dir, "trackio", f"{project}.db")) as db:
        rows = [(i, n, s, json.loads(m)) for i, n, s, m in
                db.execute("SELECT run_id, run_name, step, metrics FROM metrics ORDER BY id")]
        configs = {i: json.loads(c) for i, c in db.execute("SELECT run_id, config FROM configs")}
    return rows, configs


def by_step(rows) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for step, values in rows:
        out.setdefault(step, {}).update(values)
    return out


def wandb_records(run_dir: str) -> list[list[dict]]:
    """The records of each offline W&B run folder (one per process that logged), oldest first, read the supported
    way: `wandb leet inspect --json` prints a .wandb transaction log's records as JSON lines."""
    root = os.path.join(run_dir, "wandb")
    folders = sorted(d for d in os.listdir(root) if d.startswith("offline-run-"))
    out = []
    for folder in folders:
        proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", os.path.join(root, folder)],
                              capture_output=True, text=True, timeout=120, check=True)
        out.append([json.loads(line) for line in proc.stdout.splitlines() if line.strip()])
    return out


def wandb_history(records: list[dict]) -> list[tuple[int, dict]]:
    return [(r["history"]["step"]["num"], {k: v for k, v in r["history"]["item"].items() if not k.startswith("_")})
            for r in records if r["type"] == "history"]


def wandb_run(records: list[dict]) -> dict:
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    return run


# ------------------------------------------------------------------------------------------------- the fast tier


def test_backends_default_to_tensorboard_and_bad_ones_are_one_line_errors():
    assert load_config(None).logging.backends == ["tensorboard"]
    assert load_config(None, ["logging.backends=[]"]).logging.backends == []
    assert load_config(None, [ALL]).logging.backends == ["tensorboard", "wandb", "trackio"]
    for override, fragment in [
        ("logging.backends=[mlflow]", "logging.backends: 'mlflow' is not one of tensorboard, wandb, trackio"),
        ("logging.backends=[wandb,wandb]", "logging.backends: ['wandb', 'wandb'] names a backend twice"),
        ("logging.backends=wandb", "logging.backends: expected list, got 'wandb'"),
        ("logging.project=''", "logging.project: '' is not a project name"),
        ("logging.tensorboard=maybe", "logging.tensorboard: expected true or false, got 'maybe'; it is logging.backends"),
    ]:
        with pytest.raises(UserError) as e:
            load_config(None, [override])
        assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_logging_tensorboard_is_translated_with_a_notice_and_an_old_runs_config_still_loads(tmp_path, capsys):
    assert load_config(None, ["logging.tensorboard=false"]).logging.backends == []
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "logging.tensorboard=false is read as logging.backends=[]; use logging.backends" in err
    cfg = load_config(None, ["logging.backends=[wandb]", "logging.tensorboard=true"])
    assert cfg.logging.backends == ["tensorboard", "wandb"] and "logging.backends" in cfg.given_keys
    assert "logging.backends=[tensorboard,wandb]" in capsys.readouterr().err
    # config.yaml of a run trained before logging.backends: read to resume it, silently; backends may change then
    old = to_dict(load_config(None))
    del old["logging"]["backends"]
    old["logging"]["tensorboard"] = False
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    assert load_config(str(path), stored=True).logging.backends == []
    assert capsys.readouterr().err == ""
    assert load_config(str(path)).logging.backends == []  # the same file given as an experiment: said
    assert "use logging.backends" in capsys.readouterr().err
    assert key_class("logging.backends") == FREE and key_class("logging.project") == FREE


def test_a_missing_tracker_package_is_one_line_naming_the_extra_before_the_run_folder(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as if it were not installed
    cfg = load_config(None, [f"run.dir={run_dir}", ALL])
    with pytest.raises(UserError) as e:
        prepare_run(cfg)
    assert str(e.value) == ("logging.backends: wandb is not installed; install the tracking extra (pip install -e "
                            "'.[tracking]' in a checkout) or drop wandb from logging.backends")
    # the command: exit 2 and the one line, before DeepSpeed loads and before the run folder exists
    code = main(["train", os.path.join(REPO, "configs", "tiny.yaml"), f"run.dir={run_dir}", ALL])
    assert code == 2 and not run_dir.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: logging.backends: wandb is not installed") and "tracking" in err[-1]
    # a tracker opened where the package cannot be imported says the same
    monkeypatch.setitem(sys.modules, "trackio", None)
    with pytest.raises(UserError, match=r"trackio cannot be imported .*tracking extra"):
        TrackioTracker(load_config(None, [f"run.dir={tmp_path}"]), {}, {})


def test_tracking_json_keeps_the_trackio_run_across_restarts_and_each_run_folder_its_own_database(tmp_path,
                                                                                                monkeypatch):
    """Real trackio, in this process: a run's trackers log to run.dir/trackio under the run id kept in tracking.json;
    a restart continues that run (the same id, the later steps appended), and a second run folder in the same
    process (pretrain remove-norms trains two) gets its own database, the first left as it was."""
    monkeypatch.delenv("TRACKIO_DIR", raising=False)  # the trackers set it; restored after the test
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    for d in (first, second):
        os.makedirs(d)
    cfg = load_config(None, [f"run.dir={first}", "logging.backends=[tensorboard,trackio]"])
    save_config(cfg, os.path.join(first, "config.yaml"))

    def train(cfg, steps, start):
        out = MetricsWriter(cfg.run.dir, steps[-1], start, open_trackers(cfg, start), False, enabled=True)
        for step in steps:
            out.write({"step": step, "loss": 1.0 / step, "lr": 1e-3, "note": "text", "bpb": None}, "train")
        out.write({"step": steps[-1], "val_loss": 2.0}, "val")
        out.close()

    train(cfg, [1, 2], 0)
    ids = read_tracking(first)
    assert set(ids) == {"trackio"} and ids["trackio"]["name"] == "first" and ids["trackio"]["project"] == "normlab"
    train(cfg, [3], 2)
    assert read_tracking(first) == ids
    rows, configs = trackio_rows(first)
    assert {(i, n) for i, n, _, _ in rows} == {(ids["trackio"]["id"], "first")}
    assert [s for _, _, s, _ in rows] == [1, 2, 2, 3, 3]
    assert by_step((s, m) for _, _, s, m in rows) == {
        1: {"train/loss": 1.0, "train/lr": 1e-3}, 2: {"train/loss": 0.5, "train/lr": 1e-3, "val/val_loss": 2.0},
        3: {"train/loss": 1 / 3, "train/lr": 1e-3, "val/val_loss": 2.0}}
    config = {k: v for k, v in configs[ids["trackio"]["id"]].items() if k not in TRACKIO_KEYS}
    assert config == to_dict(cfg)

    other = load_config(None, [f"run.dir={second}", "logging.backends=[trackio]", "logging.project=other"])
    train(other, [1], 0)
    assert read_tracking(second)["trackio"]["project"] == "other"
    assert sorted(os.listdir(os.path.join(second, "trackio"))) == ["other.db", "other.lock"]
    assert [s for _, _, s, _ in trackio_rows(second, "other")[0]] == [1, 1]
    assert len(trackio_rows(first)[0]) == len(rows)  # untouched

    write_tracking(first, {"trackio": {**ids["trackio"], "name": "renamed"}})  # a kept name wins over the folder's
    train(cfg, [4], 3)
    assert {n for _, n, s, _ in trackio_rows(first)[0] if s == 4} == {"renamed"}
    with open(os.path.join(first, "tracking.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(UserError, match="tracking.json is unreadable"):
        read_tracking(first)


# ----------------------------------------------------------------------------------------------- the process tier


@pytest.mark.processes
def test_a_run_logs_everything_to_wandb_offline_and_trackio_and_a_resume_continues_both(tmp_path, data_cache,
                                                                                        monkeypatch):
    """A 4-step run with validation and per-layer diagnostics on all three backends, then resumed to 6 steps: the
    W&B offline run files and the trackio database hold exactly metrics.jsonl's and layer_stats.jsonl's numbers at
    their steps, the resolved config, and after the resume the same run id with steps 5-6 appended."""
    run_dir = str(tmp_path / "run")
    home = str(tmp_path / "home")  # where wandb keeps its settings and caches: not the machine's
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline by default: no WANDB_MODE
    env = {"WANDB_CONFIG_DIR": home, "WANDB_CACHE_DIR": home, "WANDB_DATA_DIR": home}
    args = (ALL, "diagnostics.interval=2", "eval.interval=2")
    proc = run_train(run_dir, "train.steps=4", *args, cache_dir=data_cache, env=env)
    assert "W&B: offline run" in proc.stdout and "wandb sync" in proc.stdout and "trackio: run run" in proc.stdout
    ids = read_tracking(run_dir)
    assert ids["wandb"]["name"] == ids["trackio"]["name"] == "run"
    expected = expected_by_step(run_dir)
    assert sorted(expected) == [1, 2, 3, 4] and "layers/variance/l08" in expected[4] and "val/val_bpb" in expected[4]
    stored = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))

    (first,) = wandb_records(run_dir)
    run = wandb_run(first)
    assert run["run_id"] == ids["wandb"]["id"] and run["project"] == "normlab" and run["display_name"] == "run"
    assert {k: v for k, v in run["config"]["update"].items() if k != "_wandb"} == stored
    assert by_step(wandb_history(first)) == expected
    rows, configs = trackio_rows(run_dir)
    assert {i for i, *_ in rows} == {ids["trackio"]["id"]}
    assert by_step((s, m) for _, _, s, m in rows) == expected
    assert {k: v for k, v in configs[ids["trackio"]["id"]].items() if k not in TRACKIO_KEYS} == stored

    run_train(run_dir, "train.steps=6", "train.resume=auto", *args, cache_dir=data_cache, env=env)
    assert read_tracking(run_dir) == ids
    expected = expected_by_step(run_dir)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]
    stored = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))
    assert stored["train"]["steps"] == 6
    first_again, second = wandb_records(run_dir)
    assert first_again == first
    run = wandb_run(second)
    assert run["run_id"] == ids["wandb"]["id"] and run["resume"] is True
    assert {k: v for k, v in run["config"]["update"].items() if k != "_wandb"} == stored
    assert [s for s, _ in wandb_history(second)] == [5, 6]
    assert by_step(wandb_history(first) + wandb_history(second)) == expected
    rows, configs = trackio_rows(run_dir)
    assert {i for i, *_ in rows} == {ids["trackio"]["id"]}  # the same trackio run
    assert by_step((s, m) for _, _, s, m in rows) == expected
    assert max(s for _, _, s, _ in rows[:len(rows) - 4]) == 4  # steps 5-6 appended after the first run's
    assert {k: v for k, v in configs[ids["trackio"]["id"]].items() if k not in TRACKIO_KEYS} == stored
