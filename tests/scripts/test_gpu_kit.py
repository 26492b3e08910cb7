"""scripts/gpu_kit.py (docs/PERFORMANCE.md, "GPU kit") and the `pretrain bench` options it reads (--json,
--profile). The whole rehearsal, `python3 scripts/gpu_kit.py run --out DIR --cpu`, takes minutes and runs in CI
on its own; these are its pieces that can fail, in seconds."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers.train import REPO, train_env


def _load_kit():
    spec = importlib.util.spec_from_file_location("gpu_kit", os.path.join(REPO, "scripts", "gpu_kit.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_kit"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


kit = _load_kit()


def _pin(name: str):
    return next(p for p in kit.PINS if p.name == name)


def _wheel_name(pin) -> str:
    return f"{pin.name.replace('-', '_')}-{pin.version}-py3-none-any.whl"


# ----------------------------------------------------------------------------------------------------------
# Wheels


def test_wheel_file_names_map_to_pins():
    assert kit.wheel_key("megatron_core-0.19.2-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl") == (
        "megatron-core", "0.19.2")
    assert kit.wheel_key("Pydantic_Core-2.50.5-1-cp312-cp312-manylinux2014_x86_64.whl") == ("pydantic-core", "2.50.5")
    with pytest.raises(kit.KitError):
        kit.wheel_key("deepspeed.whl")


def test_install_skips_distributions_the_interpreter_has(tmp_path):
    for name in ("deepspeed", "pydantic", "hjson"):
        (tmp_path / _wheel_name(_pin(name))).touch()
    image = {"pydantic": "2.9.0", "xxhash": "3.5.0"}  # the image's own: never shadowed, with or without a wheel
    install, skipped, missing = kit.plan_install(tmp_path, lookup=image.get)
    assert sorted(p.name for p in install) == sorted(_wheel_name(_pin(n)) for n in ("deepspeed", "hjson"))
    assert {s["name"]: (s["shipped"], s["installed"]) for s in skipped} == {
        "pydantic": (_pin("pydantic").version, "2.9.0"), "xxhash": (None, "3.5.0")}
    assert f"megatron-core=={_pin('megatron-core').version}" in missing and not any("xxhash" in m for m in missing)
    # the real lookup reads this interpreter's distributions
    assert kit.installed_version("pytest") and kit.installed_version("no-such-distribution-here") is None


def test_wheels_skips_what_is_there_and_removes_strays(tmp_path, monkeypatch, capsys):
    for pin in kit.PINS:
        (tmp_path / _wheel_name(pin)).write_bytes(b"x" * 1000)
    stale = tmp_path / "deepspeed-0.18.0-py3-none-any.whl"
    stale.touch()
    (tmp_path / "site" / "deepspeed").mkdir(parents=True)

    def no_network(pin, folder):
        raise AssertionError(f"{pin.name} is there already; nothing should be fetched")

    monkeypatch.setattr(kit, "fetch_wheel", no_network)
    assert kit.main(["wheels", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert not stale.exists() and not (tmp_path / "site").exists()
    assert f"total ({len(kit.PINS)} wheels)" in out and out.count("have ") == len(kit.PINS)


def test_wheels_over_64_mib_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    for pin in kit.PINS:
        with open(tmp_path / _wheel_name(pin), "wb") as f:
            f.truncate(6 * 2**20)  # sparse: 72 MiB in all, no disk used
    monkeypatch.setattr(kit, "fetch_wheel", lambda pin, folder: None)
    assert kit.main(["wheels", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "64 MiB" in err


# ----------------------------------------------------------------------------------------------------------
# Running stages


@pytest.mark.processes
def test_a_stage_past_its_limit_is_killed_with_its_children_and_the_next_stage_runs(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    # "slow" leaves a grandchild in the background and then blocks; "next" runs only after results.json says so
    slow = ["sh", "-c", f"sleep 300 & echo $! > {pid_file}; sleep 300"]
    check = [sys.executable, "-c", "import json, sys; r = json.load(open(sys.argv[1])); "
             "sys.exit(r['stages']['slow']['status'] != 'timeout')", str(tmp_path / "results.json")]
    k = kit.Kit(tmp_path, cpu=True, limits={"slow": 1, "next": 60}, deadline_s=120, env=dict(os.environ),
                echo=lambda *a, **kw: None)
    k.stage("slow", lambda k: k.run("sleeps", slow))
    k.stage("next", lambda k: k.run("reads results.json", check))
    stages = k.results["stages"]
    assert stages["slow"]["status"] == "timeout" and stages["slow"]["seconds"] < 15
    assert stages["next"]["status"] == "ok", (tmp_path / "kit.log").read_text()
    assert kit.failed_stages(k.results) == ["slow"]
    grandchild = Path(f"/proc/{int(pid_file.read_text())}/status")
    for _ in range(40):  # SIGKILL is delivered at once; the process may take a moment to go
        if not grandchild.exists() or "\nState:\tZ" in grandchild.read_text():  # gone, or a zombie: ended
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"{grandchild.parent.name} outlived its stage")
    log = (tmp_path / "kit.log").read_text()
    assert "=== slow: timeout" in log and "=== next: ok" in log


def test_no_run_starts_past_the_deadline(tmp_path):
    k = kit.Kit(tmp_path, cpu=True, limits={"late": 60}, deadline_s=kit.MIN_START_S - 1, env=dict(os.environ),
                echo=lambda *a, **kw: None)
    k.stage("late", lambda k: k.run("never", [sys.executable, "-c", "open('ran', 'w')"]))
    assert k.results["stages"]["late"]["status"] == "out of time" and not (tmp_path / "ran").exists()
    assert kit.failed_stages(json.loads((tmp_path / "results.json").read_text())) == ["late"]


def test_run_stops_after_the_install_stage_when_a_package_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(kit, "SITE", tmp_path / "site")
    monkeypatch.setattr(kit, "git_commit", lambda: "0" * 40)  # no git process in the fast tier
    monkeypatch.setattr(kit, "plan_install", lambda folder: ([], [], ["deepspeed==0.19.8"]))
    ran = []
    monkeypatch.setattr(kit, "STAGES", {"env": lambda k: ran.append("env")})
    assert kit.main(["run", "--out", str(tmp_path / "out"), "--cpu"]) == 1
    out = capsys.readouterr().out
    assert ran == [] and out.count("error: stopping after the install stage: deepspeed==0.19.8 (run `python "
                                   "scripts/gpu_kit.py wheels`") == 1, out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results["stages"]) == ["install"] and results["kit"]["failed_stages"] == ["install"]


def test_run_refuses_a_folder_with_files_in_it(tmp_path, capsys):
    (tmp_path / "old.txt").touch()
    assert kit.main(["run", "--out", str(tmp_path), "--cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and err.count("\n") == 1


def test_diagnostics_cost_is_read_from_the_measured_steps():
    def row(times, first=4):
        return {"step_ms": sorted(times)[len(times) // 2], "mean_step_ms": sum(times) / len(times),
                "step_times_ms": times, "first_timed_step": first}

    times = [10.0] * 120
    times[100 - 4] = 30.0  # step 100 is the 97th timed step: the one interval 100 measures
    rows = {d["interval"]: d for d in kit.diagnostics_summary({0: row([10.0] * 120), 100: row(times),
                                                               1: row([11.0] * 120)})}
    assert rows[100]["measured_steps"] == 1 and rows[100]["per_measured_step_ms"] == pytest.approx(20.0)
    assert rows[100]["amortized"] == pytest.approx(20.0 / (100 * 10.0))  # 2% of a step, spread over 100 steps
    assert rows[1]["amortized"] == pytest.approx(0.1) and rows[0]["median_ratio"] == 1.0


def test_table_has_a_row_per_run_including_the_ones_that_ended_badly():
    results = {"kit": {"mode": "gpu", "started": "2026-11-27T10:00:00+00:00"},
               "env": {"device": {"name": "NVIDIA H100 80GB HBM3"}, "torch": {"version": "2.11.0", "cuda": "13.0"}},
               "bench": [
                   {"command": "pretrain bench --presets 1b --compile", "preset": "1b", "compile": True,
                    "run_status": "timeout"},
                   {"command": "pretrain bench --presets 130m", "preset": "130m", "compile": False, "micro": 32,
                    "step_ms": 40.0, "tokens_per_s": 204800.0, "tflops": 140.4, "mfu": 0.142, "mem_gib": 9.9,
                    "precision": "bf16", "seq_len": 256, "run_status": "ok", "host_syncs": 4}],
               "memory": [
                   {"preset": "1b", "fused_loss": True, "activation_checkpointing": "none", "micro": 8, "seq_len": 2048,
                    "step_ms": 900.0, "tokens_per_s": 18204.4, "mfu": 0.41, "mem_gib": 52.3, "host_syncs": 4,
                    "plan_mem_gib": 50.1, "plan_tokens_per_s": 17000.0, "run_status": "ok"},
                   {"preset": "1b", "fused_loss": False, "activation_checkpointing": "none", "run_status": "failed",
                    "command": "pretrain bench --presets 1b --no-fused-loss"}],
               "profile": {"preset": "1b", "step": 4, "step_wall_ms": 410.0, "device_busy_ms": 380.5, "host_syncs": 3,
                           "sync_events": {"cudaStreamSynchronize": 3, "aten::item": 3, "cudaDeviceSynchronize": 0},
                           "peak_mem_gib": 41.2, "top_kernels": [{"name": "sm90_gemm", "calls": 96, "device_ms": 250.0}],
                           "top_ops": []}}
    table = kit.render_table(results)
    assert "device busy 380.5 ms; host synchronisations 3 (cudaStreamSynchronize 3, aten::item 3), peak memory " \
           "41.2 GiB" in table and "| `sm90_gemm` | 96 | 250.00 |" in table
    assert "NVIDIA H100 80GB HBM3, 2026-11-27" in table
    assert "| `pretrain bench --presets 130m` | 130m | no | 32 | 40.0 | 204,800 | 140.4 | 14.2% | 9.9 | 4 |" in table
    assert "| on | none | 8 | 2048 | 900.0 | 18,204 | 41.0% | 52.3 | 50.1 | 17,000 | 4 |" in table
    assert "| off | none | | | failed |" in table
    assert "| `pretrain bench --presets 1b --compile` | 1b | yes | | timeout |" in table


MEMORY_ROW = {"preset": "tiny", "seq_len": 64, "micro": 4, "precision": "fp32", "fused_loss": False,
              "activation_checkpointing": "full", "mem_gib": 0.0}


def test_a_memory_row_is_planned_with_the_shape_bench_ran(capsys):
    from pretrain.cli import main

    assert main(["plan", *kit.plan_args(MEMORY_ROW, kit.CPU_STAND_IN_GPU)]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["layout"] | {"micro_batch_size": 4, "global_batch_size": 4, "seq_len": 64, "zero_stage": 0,
                                "fused_loss": False, "activation_checkpointing": "full"} == planned["layout"]
    assert planned["model"]["preset"] == "tiny" and 0 < planned["allocated_gib"] < planned["memory_gib_per_gpu"]


@pytest.mark.processes
def test_the_memory_stage_writes_the_plan_beside_its_row(tmp_path):
    row = dict(MEMORY_ROW)
    k = kit.Kit(tmp_path, cpu=True, limits={"memory": 300}, deadline_s=600, env=kit.child_env(True, tmp_path),
                echo=lambda *a, **kw: None)
    k.stage("memory", lambda k: kit.add_plan(k, row, tmp_path / "plan.json"))
    assert k.results["stages"]["memory"]["status"] == "ok", (tmp_path / "kit.log").read_text()[-3000:]
    assert row["plan_mem_gib"] > 0 and row["plan_gpu"] == "H100 SXM" and row["plan_tokens_per_s"] is None
    table = kit.render_table({"kit": {"mode": "cpu", "started": "2026-12-06T10:00:00+00:00"},
                              "memory": [{**row, "step_ms": 10.0, "tokens_per_s": 100.0}]})
    assert f"| {row['plan_mem_gib']:.1f} |  |" in table


# ----------------------------------------------------------------------------------------------------------
# pretrain bench --json / --profile


@pytest.mark.processes
def test_bench_json_keeps_earlier_rows_when_a_later_preset_fails_and_profile_writes_its_files(tmp_path, data_cache):
    rows_path, prof = tmp_path / "rows.json", tmp_path / "prof"
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain", "bench", "--presets", "tiny", "no-such-preset", "--steps", "2",
         "--seq-len", "32", "--micro-batch-size", "2", "--json", str(rows_path), "--profile", str(prof)],
        cwd=REPO, env=train_env(data_cache), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: model.preset"), proc.stderr
    (row,) = json.loads(rows_path.read_text())
    assert row["preset"] == "tiny" and row["device"] == "CPU" and row["precision"] == "fp32"
    assert (row["micro"], row["seq_len"], row["steps"], row["compile"], row["diagnostics_interval"]) == (2, 32, 2,
                                                                                                       False, 0)
    assert len(row["step_times_ms"]) == 2 and row["tokens_per_s"] > 0 and row["mfu"] is None
    assert row["first_timed_step"] == 5  # 3 warm-up steps and the profiled one come first
    summary = json.loads((prof / "profile.json").read_text())
    assert summary["step"] == 4 and summary["peak_mem_gib"] is None
    assert summary["host_syncs"] == 0 and "CPU" in summary["host_syncs_note"]  # no device to wait for
    assert summary["sync_events"]["aten::item"] > 0  # the step's scalar reads: what syncs on a GPU
    assert "aten::mm" in {op["name"] for op in summary["top_ops"]} and "aten::mm" in (prof / "profile.txt").read_text()
    with gzip.open(prof / "trace.json.gz") as f:
        assert json.load(f)["traceEvents"]


def test_profile_summary_counts_cuda_synchronisations_of_the_step_only():
    from torch.autograd import DeviceType

    from pretrain.analysis.throughput import PROFILE_RANGE, summarize_profile

    def event(name, start, end, device=DeviceType.CPU, device_us=0.0):
        return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end),
                               self_device_time_total=device_us)

    events = [
        event(PROFILE_RANGE, 100, 1100),
        event("aten::item", 200, 210), event("aten::_local_scalar_dense", 201, 209),
        event("cudaMemcpyAsync", 202, 205), event("cudaStreamSynchronize", 205, 208),
        event("cudaStreamSynchronize", 600, 620),
        event("cudaDeviceSynchronize", 1200, 1300),  # the wait that closes the trace, after the step
        event("Memcpy DtoH (Device -> Pageable)", 203, 204, DeviceType.CUDA, 2.0),
        event("Memcpy DtoH (Device -> Pinned)", 603, 604, DeviceType.CUDA, 2.0),
        event("sm90_xmma_gemm_bf16", 300, 500, DeviceType.CUDA, 200.0),
        event("sm90_xmma_gemm_bf16", 500, 700, DeviceType.CUDA, 200.0),
        event("elementwise_kernel", 700, 710, DeviceType.CUDA, 10.0),
    ]
    averages = [SimpleNamespace(key="aten::mm", count=2, device_type=DeviceType.CPU, self_device_time_total=400.0,
                                device_time_total=400.0, self_cpu_time_total=30.0, cpu_time_total=40.0)]
    s = summarize_profile(events, averages, on_cuda=True)
    assert s["host_syncs"] == 2 and s["sync_events"]["cudaDeviceSynchronize"] == 0
    assert s["sync_events"]["Memcpy DtoH"] == 2 and s["sync_events"]["aten::item"] == 1
    assert s["top_kernels"][0] == {"name": "sm90_xmma_gemm_bf16", "calls": 2, "device_ms": 0.4}
    assert s["device_busy_ms"] == pytest.approx(0.414) and s["step_wall_ms"] == 1.0 and s["host_syncs_note"] is None
