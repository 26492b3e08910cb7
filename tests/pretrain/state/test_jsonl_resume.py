"""Reopening metrics.jsonl / layer_stats.jsonl on resume: later entries dropped, a torn last line dropped and
reported, corruption before the last line refused with one line naming the file, the line and the fix."""

import json

import pytest

from pretrain.diagnostics.writer import LayerStatsWriter
from pretrain.errors import UserError
from pretrain.runs import truncate_jsonl
from pretrain.train.metrics import MetricsWriter


def entries(*steps):
    return "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps)


def steps_in(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_entries_after_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(entries(1, 2, 3, 4) + json.dumps({"step": 2, "val_loss": 0.5}) + "\n\n" + entries(5))
    assert truncate_jsonl(str(path), after_step=2) is None
    assert steps_in(path) == [1, 2, 2]
    assert truncate_jsonl(str(path), after_step=0) is None
    assert path.read_text() == ""


def test_missing_file_is_nothing_to_do(tmp_path):
    assert truncate_jsonl(str(tmp_path / "metrics.jsonl"), after_step=5) is None
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("torn", ['{"step": 1', '{"step": 4, "loss": 0.2', "\0\0\0\0", '{"step": 4, "lo'])
def test_torn_last_line_is_dropped_and_returned(tmp_path, torn):
    path = tmp_path / "metrics.jsonl"
    path.write_text(entries(1, 2, 3) + torn)
    assert truncate_jsonl(str(path), after_step=10) == torn
    assert steps_in(path) == [1, 2, 3]
    assert truncate_jsonl(str(path), after_step=10) is None  # the file is clean now


def test_complete_last_line_without_newline_is_kept_and_terminated(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(entries(1, 2) + json.dumps({"step": 3}))  # cut exactly before its newline
    assert truncate_jsonl(str(path), after_step=10) is None
    with open(path, "a") as f:  # what the writer does next
        f.write(json.dumps({"step": 4}) + "\n")
    assert steps_in(path) == [1, 2, 3, 4]


@pytest.mark.parametrize("bad", ['{"step": 2, "loss"', "[1, 2]", '{"step": "two"}', "garbage"])
def test_corruption_before_the_last_line_is_refused(tmp_path, bad):
    path = tmp_path / "layer_stats.jsonl"
    original = entries(1) + "\n" + bad + "\n" + entries(3, 4)
    path.write_text(original)
    with pytest.raises(UserError) as e:
        truncate_jsonl(str(path), after_step=10)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: line 3 is not a JSON object")
    assert "fix or delete that line (or move layer_stats.jsonl away) and resume" in message
    assert path.read_text() == original  # nothing rewritten


def test_metrics_writer_says_it_dropped_a_torn_line(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text(entries(1, 2, 3) + '{"step": 4, "loss": 0.1')
    writer = MetricsWriter(str(tmp_path), 10, 3, trackers=(), progress_bar=False, enabled=True)
    out = capsys.readouterr().out
    assert out == "metrics.jsonl: dropped a torn last line (a write was cut off): '{\"step\": 4, \"loss\": 0.1'\n"
    writer.write({"step": 4, "loss": 0.1}, "train")
    assert steps_in(tmp_path / "metrics.jsonl") == [1, 2, 3, 4]
    MetricsWriter(str(tmp_path), 10, 4, trackers=(), progress_bar=False, enabled=True)
    assert capsys.readouterr().out == ""  # a clean file: nothing to say


def test_long_torn_line_is_shortened_in_the_log(tmp_path, capsys):
    torn = '{"step": 4, "variance": [' + ", ".join(["1.5"] * 200)
    (tmp_path / "metrics.jsonl").write_text(entries(1) + torn)
    MetricsWriter(str(tmp_path), 10, 3, trackers=(), progress_bar=False, enabled=True)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and len(out) < 200 and "...'" in out


def test_layer_stats_writer_drops_and_reports_a_torn_line(tmp_path, capsys):
    path = tmp_path / "layer_stats.jsonl"
    path.write_text(entries(10, 20, 30) + '{"step": 40, "layers": 8, "varia')
    said = []
    LayerStatsWriter(str(tmp_path), start_step=20, say=said.append)
    assert said == ["layer_stats.jsonl: dropped a torn last line (a write was cut off): '{\"step\": 40, \"layers\": 8, \"varia'"]
    assert steps_in(path) == [10, 20]
    path.write_text(entries(10) + '{"step": 20')
    LayerStatsWriter(str(tmp_path), start_step=20)  # default: printed
    assert capsys.readouterr().out.startswith("layer_stats.jsonl: dropped a torn last line")
