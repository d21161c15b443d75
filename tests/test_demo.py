"""A reduced-size demo on the committed base model, end to end through the CLI entry point."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from diffunlearn.cli import main

SMALL = ["num_pairs=8", "steps=2", "batch_size=4", "eval_prompts=8", "data_steps=4", "eval_steps=4"]


@pytest.mark.parametrize("concept", ["three", "red"])
def test_reduced_demo_writes_summary_report_and_pictures(tmp_path, concept, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--concept", concept, "--out", str(out), "--quiet", *SMALL]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["concept"] == concept
    assert set(summary["methods"]) == {"base", "ga", "graddiff", "rg"}
    for name, m in summary["methods"].items():
        for key in ("forget_score", "alignment", "quality_fd", "seconds"):
            assert isinstance(m[key], float), (name, key)
        assert 0.0 <= m["forget_score"] <= 1.0 and 0.0 <= m["alignment"] <= 1.0
        assert m["quality_fd"] >= 0.0
    assert summary["methods"]["base"]["seconds"] == 0.0
    assert all(summary["methods"][m]["seconds"] > 0 for m in ("ga", "graddiff", "rg"))
    report = (out / "report.md").read_text()
    assert "| rg |" in report and "grid_forget.png" in report
    for picture in ("grid_forget.png", "grid_remain.png", "tradeoff.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for method in ("ga", "graddiff", "rg"):
        lines = (out / method / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 2
        assert (out / method / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        assert (out / method / "config.yaml").read_text().startswith("# diffunlearn demo")
    # The training images were generated once, with a manifest, and are reused on a second run.
    manifest = json.loads((out / "data" / "forget" / "manifest.json").read_text())
    assert len(manifest["prompts"]) == len(manifest["seeds"]) == len(manifest["image_sha256"]) == 8
    assert manifest["steps"] == 4
    if concept == "red":
        # graddiff and rg name the colour's neighbours in their remain sets (their own remain_neighbours),
        # ga does not: one data folder per setting, each method trained on its own (results.json).
        from diffunlearn.config import build_config
        from diffunlearn.data.training import prompt_texts, training_prompt_sets

        remain = {d: json.loads((out / d / "remain" / "manifest.json").read_text())["prompts"]
                  for d in ("data", "data-graddiff", "data-rg")}
        for method, folder, fraction in (("ga", "data", 0.0), ("graddiff", "data-graddiff", 0.545),
                                         ("rg", "data-rg", 0.979)):
            cfg = build_config(None, SMALL, base={"concept": "red", "method": method})
            assert cfg.remain_neighbours == fraction
            assert remain[folder] == prompt_texts(training_prompt_sets(cfg)[1])
        assert len({tuple(p) for p in remain.values()}) == 3
        for method, folder, fraction in (("ga", "data", 0.0), ("graddiff", "data-graddiff", 0.545),
                                         ("rg", "data-rg", 0.979)):
            card = (out / method / "model" / "README.md").read_text()  # the model card records its data
            assert f'"folder": "{out / folder}"' in card and f'"remain_neighbours": {fraction}' in card
        # The forget prompts do not change with remain_neighbours: copied from data/, not sampled again.
        for d in ("data-graddiff", "data-rg"):
            assert (json.loads((out / d / "forget" / "manifest.json").read_text())["image_sha256"]
                    == json.loads((out / "data" / "forget" / "manifest.json").read_text())["image_sha256"])
    # A finished run is never overwritten without --force.
    assert main(["demo", "--concept", concept, "--out", str(out), "--quiet", *SMALL]) == 2
    assert "already holds a finished run" in capsys.readouterr().err


def test_interrupted_demo_never_looks_complete(tmp_path, monkeypatch, capsys):
    import diffunlearn.jobs.run as demo  # the demo's runs go through jobs.run.reuse_or_run -> run_job

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_job", interrupted)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet", *SMALL]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not (out / "summary.json").exists() and not (out / "report.md").exists()


def test_a_demo_interrupted_after_some_methods_reuses_them(tmp_path, monkeypatch):
    import diffunlearn.jobs.run as demo  # the demo's runs go through jobs.run.reuse_or_run -> run_job

    out = tmp_path / "demo"
    real = demo.run_job
    calls = []

    def second_is_interrupted(task, adapter, data, cfg, *args, **kwargs):
        calls.append(cfg.method)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(task, adapter, data, cfg, *args, **kwargs)

    monkeypatch.setattr(demo, "run_job", second_is_interrupted)
    assert main(["demo", "--out", str(out), "--methods", "ga,rg", "--quiet", *SMALL]) == 130
    first = json.loads((out / "ga" / "results.json").read_text())
    monkeypatch.setattr(demo, "run_job", real)
    calls.clear()
    monkeypatch.setattr(demo, "run_job", lambda task, adapter, data, cfg, *a, **k: (calls.append(cfg.method),
                                                                           real(task, adapter, data, cfg, *a, **k))[1])
    assert main(["demo", "--out", str(out), "--methods", "ga,rg", "--quiet", *SMALL]) == 0
    assert calls == ["rg"]  # ga was finished and is reused
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"]["ga"]["forget_score"] == first["forget_score"]
    assert summary["methods"]["ga"]["quality_fd"] == first["quality_fd"]
    # A run is reused only for the images it trained on: ga's record says other images (as a demo from
    # before each method had its own data folder would), and a run without the record is not trusted.
    rg = json.loads((out / "rg" / "results.json").read_text())
    assert len(first["training_data"]) == 16 and rg["training_data"] == first["training_data"]  # one folder
    for record in ("0123456789abcdef", None):
        stale = {k: v for k, v in first.items() if k != "training_data"}
        if record:
            stale["training_data"] = record
        (out / "ga" / "results.json").write_text(json.dumps(stale))
        for marker in ("summary.json", "report.md"):  # as if this demo had been interrupted
            (out / marker).unlink()
        calls.clear()
        assert main(["demo", "--out", str(out), "--methods", "ga,rg", "--quiet", *SMALL]) == 0
        assert calls == ["ga"]  # re-run; rg reused
        again = json.loads((out / "ga" / "results.json").read_text())
        assert again["training_data"] == first["training_data"]
        assert again["forget_score"] == first["forget_score"]  # the same images, the same training


def test_demo_with_attacks_reports_each_models_asr(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--methods", "graddiff", "--attacks", "paraphrase", "--quiet",
                 *SMALL]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for name in ("base", "graddiff"):
        report = json.loads((out / "attacks" / name / "results.json").read_text())
        assert summary["methods"][name]["asr"] == {"paraphrase": report["attacks"]["paraphrase"]["asr"]["oracle"]}
        assert report["metrics"]["oracle"]["forget"]["asr"] == report["metrics"]["oracle"]["forget"]["forget_score"]
    assert "ASR paraphrase ↓ |" in (out / "report.md").read_text()


def test_demo_refuses_an_unknown_attack_before_any_work(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--attacks", "magic", "--quiet"]) == 2
    assert "unknown attack 'magic'" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_demo_in_two_processes_gives_the_one_process_numbers(tmp_path, capsys):
    """--jobs 2 trains and scores the models in two spawned processes of one thread each; on the same
    data and seeds they must be the numbers of the one-process demo, bit for bit."""
    runs = {}
    for jobs in (1, 2):
        out = tmp_path / f"jobs-{jobs}"
        assert main(["demo", "--out", str(out), "--methods", "ga,rg", "--jobs", str(jobs), "--quiet", *SMALL]) == 0
        runs[jobs] = json.loads((out / "summary.json").read_text())
        assert runs[jobs]["processes"] == jobs
        assert (out / "grid_forget.png").stat().st_size > 1000 and (out / "rg" / "model").is_dir()
    for name in ("base", "ga", "rg"):
        for key in ("forget_score", "alignment", "quality_fd"):
            assert runs[2]["methods"][name][key] == runs[1]["methods"][name][key], (name, key)
    for name in ("ga", "rg"):
        assert (runs[2]["methods"][name]["training"]["final_forget_loss"]
                == runs[1]["methods"][name]["training"]["final_forget_loss"])
    assert main(["demo", "--out", str(tmp_path / "bad"), "--jobs", "-1", "--quiet"]) == 2
    assert "--jobs must be" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["demo", "--all-methods", "--jobs", "2", "--out", str(tmp_path / "lb"), "--quiet"]) == 2
    assert "--jobs belongs to the text demo" in capsys.readouterr().err


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (read from /proc: no library needed for one field)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads the process tree from /proc")
def test_ctrl_c_stops_a_two_process_demo_and_its_workers(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "demo"
    argv = [sys.executable, "-m", "diffunlearn.cli", "demo", "--out", str(out), "--methods", "ga,rg", "--jobs", "2",
            "--quiet", *SMALL, "steps=400"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    demo = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    started = out / "rg" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (started.is_file() and started.read_text().count("\n") >= 2):
        time.sleep(0.2)
    assert started.is_file(), "the demo never started training"
    workers = _children(demo.pid)
    assert len(workers) >= 2  # the pool's two processes (and multiprocessing's resource tracker)
    demo.send_signal(signal.SIGINT)
    assert demo.wait(timeout=60) == 130
    assert "interrupted" in demo.stderr.read()
    time.sleep(1)
    for pid in workers:
        stat = Path(f"/proc/{pid}/stat")
        state = stat.read_text().rsplit(")", 1)[1].split()[0] if stat.exists() else "gone"
        assert state in ("gone", "Z"), f"worker {pid} outlived the demo (state {state})"
    assert not (out / "summary.json").exists() and not (out / "rg" / "results.json").exists()
