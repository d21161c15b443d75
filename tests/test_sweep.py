"""``diffunlearn sweep``: the Pareto front, grid parsing and validation, and a two-point sweep on the
embedded digit world end to end, rerun to show that finished points are skipped."""

from __future__ import annotations

import json
import math

import pytest

from diffunlearn import runner
from diffunlearn.errors import UserError
from diffunlearn.sweep import pareto_front, parse_grid, point_name, run_sweep

TINY = ["steps=2", "num_pairs=16", "eval_prompts=8", "eval_steps=2", "data_steps=2", "batch_size=8",
        "checkpoint_every=1"]


def _must_not_run(*args, **kwargs):
    raise AssertionError("a finished run or evaluation was redone")


@pytest.mark.parametrize(("points", "expected"), [
    ([], []),
    ([(0.3, 0.4)], [True]),
    # (0.2, 0.8) is beaten by (0.1, 0.9) on both axes; (0.5, 0.5) by everything; (0.3, 0.95) aligns best.
    ([(0.1, 0.9), (0.2, 0.8), (0.3, 0.95), (0.5, 0.5)], [True, False, True, False]),
    ([(0.2, 0.5), (0.2, 0.5)], [True, True]),                 # identical points do not dominate each other
    ([(0.2, 0.5), (0.2, 0.6)], [False, True]),                # same forgetting: higher alignment wins
    ([(0.1, 0.5), (0.2, 0.5)], [True, False]),                # same alignment: lower forgetting wins
    ([(0.1, 0.9), (0.1, 0.9), (0.2, 0.9)], [True, True, False]),
    ([(math.nan, 1.0), (0.5, 0.5)], [False, True]),           # NaN is never optimal and never dominates
])
def test_pareto_front(points, expected):
    assert pareto_front(points) == expected


def test_parse_grid_keeps_order_and_fixed_overrides():
    grid = parse_grid(["remain_weight=0.5, 1,5", "forget_cap=hinge,none", "steps=20"])
    assert grid == {"remain_weight": ["0.5", "1", "5"], "forget_cap": ["hinge", "none"], "steps": ["20"]}
    assert list(grid) == ["remain_weight", "forget_cap", "steps"]
    # lora_targets' own values hold commas, so its alternatives are separated by ";".
    assert parse_grid(["lora_targets=to_q,to_k;to_q", "lr=1e-5,1e-4"])["lora_targets"] == ["to_q,to_k", "to_q"]


@pytest.mark.parametrize(("specs", "message"), [
    ([], "no grid given"),
    (["remain_weight"], "is not of the form key=v1,v2"),
    (["=1,2"], "is not of the form key=v1,v2"),
    (["colour=red,blue"], "unknown key `colour`"),
    (["remain_weight=1,,2"], "has an empty value"),
    (["remain_weight=1,"], "has an empty value"),
    (["remain_weight=1,2", "remain_weight=3,4"], "appears twice"),
    (["remain_weight=1,2,1"], "lists '1' more than once"),
    (["steps=2", "lr=1e-4"], "nothing varies"),
])
def test_parse_grid_errors(specs, message):
    with pytest.raises(UserError, match=message):
        parse_grid(specs)


def test_point_names_are_filesystem_safe():
    assert point_name({"remain_weight": "0.5", "forget_cap": "hinge"}) == "remain_weight-0.5_forget_cap-hinge"
    assert point_name({"model": "/models/sd v1"}) == "model--models-sd-v1"
    long = point_name({"model": "/x" * 200})
    assert len(long) <= 120 and "/" not in long and long != point_name({"model": "/x" * 201})


@pytest.mark.parametrize(("config", "specs", "extra", "message"), [
    (None, ["remain_weight=0.5,-1"], {}, "grid point remain_weight=-1: invalid configuration: `remain_weight` must"),
    (None, ["method=rg,magic"], {}, "grid point method=magic: .*unknown method 'magic'"),
    ("missing.yaml", ["remain_weight=1,2"], {}, "config file missing.yaml does not exist"),
    (None, ["model=tiny-sd", "concept=nudity", "remain_weight=1,2"], {}, "pass --metrics and --prompts"),
    (None, ["remain_weight=1,2"], {"metrics": ["oracle"]}, "--metrics and --prompts go together"),
    (None, ["remain_weight=1,2"], {"metrics": ["sharpness"], "prompts": ["world:three"]}, "unknown metric"),
    (None, ["remain_weight=1,2"], {"metrics": ["fid"], "prompts": ["world:three"]}, "no forgetting number"),
    (None, ["remain_weight=1,2"], {"metrics": ["oracle"], "prompts": ["nope.csv"]}, "nope"),
])
def test_bad_sweeps_fail_before_anything_runs(tmp_path, monkeypatch, config, specs, extra, message):
    monkeypatch.setattr(runner, "run_unlearning", _must_not_run)
    out = tmp_path / "sweep"
    with pytest.raises(UserError, match=message):
        run_sweep(config, specs, out, progress=False, **extra)
    assert not out.exists()


@pytest.fixture()
def one_thread():
    """The digit world's model is so small that a second intra-op thread only adds synchronisation;
    on a busy 2-core machine the 2-thread run measured ~10x slower (100 s against 10 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_sweep_end_to_end_then_resumed(tmp_path, monkeypatch, one_thread):
    out = tmp_path / "sweep"
    # No config file: the first grid entry arrives in the CONFIG position, as from the command line.
    rows = run_sweep("remain_weight=0.5,5", TINY, out, progress=False, command="diffunlearn sweep test")
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["rows"] == rows and summary["command"] == "diffunlearn sweep test"
    assert summary["varying"] == ["remain_weight"] and summary["grid"]["steps"] == ["2"]
    assert summary["forgetting_metric"] == "oracle/forget/forget_score"
    assert summary["alignment_metric"] == "oracle/remain/alignment"
    assert [r["run"] for r in rows] == ["remain_weight-0.5", "remain_weight-5"]
    assert [r["values"] for r in rows] == [{"remain_weight": "0.5"}, {"remain_weight": "5"}]
    for r in rows:
        for key in ("forgetting", "alignment", "seconds"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (r["run"], key)
        assert r["metrics"]["oracle/remain/quality_fd"] >= 0
        assert (out / r["run"] / "results.json").is_file()
        assert (out / r["run"] / "config.yaml").read_text().startswith("# diffunlearn sweep test")
    assert any(r["pareto"] for r in rows)
    # Both points share one folder of training images (same data settings).
    assert len(list((out / "data").iterdir())) == 1
    table = (out / "sweep.md").read_text()
    assert "| remain_weight-0.5 | 0.5 |" in table and "| remain_weight-5 | 5 |" in table and "✓" in table
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp"))

    # Rerun: finished points are skipped and the summary is rebuilt identically from their folders.
    mtimes = {r["run"]: (out / r["run"] / "results.json").stat().st_mtime_ns for r in rows}
    monkeypatch.setattr(runner, "run_unlearning", _must_not_run)
    again = run_sweep(None, ["remain_weight=0.5,5", *TINY], out, progress=False, command="diffunlearn sweep test")
    assert again == rows
    assert json.loads((out / "sweep.json").read_text()) == summary
    assert {r: (out / r / "results.json").stat().st_mtime_ns for r in mtimes} == mtimes

    # A finished point made with other settings is never reused silently.
    with pytest.raises(UserError, match="holds a finished run made with other settings \\(steps 2 there, 3 now\\)"):
        run_sweep(None, ["remain_weight=0.5,5", *("steps=3" if s == "steps=2" else s for s in TINY)], out,
                  progress=False)

    # An interrupted point (no results.json, a checkpoint of the same settings) continues from it.
    (out / "remain_weight-5" / "results.json").unlink()
    calls = []

    def spy(cfg, run_dir, **kwargs):
        calls.append((run_dir.name, kwargs["resume"]))
        return real(cfg, run_dir, **kwargs)

    monkeypatch.undo()
    real = runner.run_unlearning
    monkeypatch.setattr(runner, "run_unlearning", spy)
    resumed = run_sweep(None, ["remain_weight=0.5,5", *TINY], out, progress=False, command="diffunlearn sweep test")
    assert calls == [("remain_weight-5", True)]
    assert resumed[0] == rows[0] and resumed[1]["metrics"] == rows[1]["metrics"]

    # --metrics/--prompts: every finished point is evaluated into RUN/eval (the path Stable Diffusion
    # sweeps take), its numbers replace the training-time ones, and a finished evaluation is reused.
    from diffunlearn.evaluate import suite
    from diffunlearn.evaluate.base import MetricOptions

    evaluation = {"metrics": ["oracle"], "prompts": ["world:three:test:forget:8", "world:three:test:remain:8"],
                  "metric_options": MetricOptions(concept="three", device="cpu")}
    scored = run_sweep(None, ["remain_weight=0.5,5", *TINY], out, progress=False, **evaluation)
    for r in scored:
        assert (out / r["run"] / "eval" / "results.json").is_file()
        assert r["forgetting_metric"] == "oracle/forget/forget_score" and math.isfinite(r["forgetting"])
        assert "oracle/remain/alignment_digit" in r["metrics"]  # only the eval folder records this one
    monkeypatch.setattr(suite, "evaluate", _must_not_run)
    assert run_sweep(None, ["remain_weight=0.5,5", *TINY], out, progress=False, **evaluation) == scored


def test_cli_sweep_reports_a_bad_grid_point_and_writes_nothing(tmp_path, capsys):
    from diffunlearn import cli

    assert cli.main(["sweep", "remain_weight=-1,2", "steps=2", "--out", str(tmp_path / "s"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "remain_weight" in err and "Traceback" not in err
    assert not (tmp_path / "s" / "sweep.json").exists()
