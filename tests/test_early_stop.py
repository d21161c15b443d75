"""early_stop_every: the loop stops once the task's training-side forget score is low enough, a
resumed run stops at the same step with the same weights, and the worlds' probes read real models."""

from __future__ import annotations

import json

import pytest
import torch

from diffunlearn.cli import main
from diffunlearn.config import build_config
from diffunlearn.core.training import unlearn
from diffunlearn.jobs.runfolder import training_summary
from diffunlearn.methods import get_method
from test_methods import fresh_adapter, snapshot, tiny_data


def drift_probe(adapter, base: dict[str, torch.Tensor], distance: float):
    """A probe that reads the model: "forgotten" (0.0) once the weights moved farther than ``distance``
    from ``base``, else 1.0, so its answer depends on the weights alone, as a real probe's does."""
    def probe() -> float:
        now = snapshot(adapter.unet)
        moved = torch.sqrt(sum(((now[k] - base[k]) ** 2).sum() for k in base)).item()
        return 0.0 if moved > distance else 1.0
    return probe


def moved_after(text_encoder, data, steps: int) -> float:
    adapter = fresh_adapter(text_encoder)
    base = snapshot(adapter.unet)
    cfg = build_config(None, ["method=rg", f"steps={steps}", "batch_size=4", "lr=1e-3", "diagnose=false"])
    unlearn(adapter, get_method("rg"), cfg, *data, progress=False)
    now = snapshot(adapter.unet)
    return torch.sqrt(sum(((now[k] - base[k]) ** 2).sum() for k in base)).item()


def test_the_loop_stops_at_the_first_check_that_passes(text_encoder, tmp_path):
    adapter = fresh_adapter(text_encoder)
    scores = iter([0.9, 0.4, 0.03, 0.0])
    calls = []

    def probe() -> float:
        calls.append(1)
        return next(scores)

    cfg = build_config(None, ["method=rg", "steps=20", "batch_size=4", "lr=1e-3", "early_stop_every=3",
                              "early_stop_score=0.05"])
    history = unlearn(adapter, get_method("rg"), cfg, *tiny_data(adapter), metrics_path=tmp_path / "m.jsonl",
                      progress=False, probe=probe)
    assert len(calls) == 3  # steps 3, 6 and 9; the third scored 0.03 <= 0.05
    assert [h["step"] for h in history] == list(range(1, 10))
    assert [(h["step"], h["probe_forget"]) for h in history if "probe_forget" in h] == [(3, 0.9), (6, 0.4), (9, 0.03)]
    assert [h["early_stop"] for h in history if "probe_forget" in h] == [False, False, True]
    lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 10))  # one line per step, the check inside it
    summary = training_summary(history, 1.0)
    assert summary["early_stop_step"] == 9 and summary["steps"] == 9 and summary["probe_forget"] == 0.03


def test_no_pass_runs_every_step_and_says_so(text_encoder):
    adapter = fresh_adapter(text_encoder)
    cfg = build_config(None, ["method=graddiff", "steps=6", "batch_size=4", "early_stop_every=2"])
    history = unlearn(adapter, get_method("graddiff"), cfg, *tiny_data(adapter), progress=False, probe=lambda: 0.5)
    assert len(history) == 6 and sum("probe_forget" in h for h in history) == 3
    summary = training_summary(history, 1.0)
    assert summary["early_stop_step"] is None and summary["probe_forget"] == 0.5
    assert "early_stop_step" not in training_summary(history[:1], 1.0)  # no check yet: no early-stop keys


def test_a_resumed_run_stops_at_the_same_step_with_the_same_weights(text_encoder, tmp_path):
    data = tiny_data(fresh_adapter(text_encoder), n=12)
    # A drift threshold between the weights' distance after 3 and after 6 steps: the check at step 6 passes.
    distance = (moved_after(text_encoder, data, 3) + moved_after(text_encoder, data, 6)) / 2
    over = ["method=rg", "batch_size=4", "lr=1e-3", "diagnose=false", "early_stop_every=3", "checkpoint_every=2"]
    cfg = build_config(None, [*over, "steps=20"])

    straight = fresh_adapter(text_encoder)
    history = unlearn(straight, get_method("rg"), cfg, *data, progress=False,
                      probe=drift_probe(straight, snapshot(straight.unet), distance))
    assert len(history) == 6 and history[-1]["early_stop"] and not history[2]["early_stop"]

    # Interrupted after step 4 (checkpoint step 4), then resumed with the full config.
    first = fresh_adapter(text_encoder)
    base = snapshot(first.unet)
    unlearn(first, get_method("rg"), build_config(None, [*over, "steps=4"]), *data, progress=False,
            checkpoint_dir=tmp_path / "ckpt", metrics_path=tmp_path / "m.jsonl",
            probe=drift_probe(first, base, distance))
    resumed = fresh_adapter(text_encoder)
    history = unlearn(resumed, get_method("rg"), cfg, *data, progress=False, checkpoint_dir=tmp_path / "ckpt",
                      metrics_path=tmp_path / "m.jsonl", resume=True, probe=drift_probe(resumed, base, distance))
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6] and history[-1]["early_stop"]
    a, b = snapshot(straight.unet), snapshot(resumed.unet)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_digit_and_class_probes_read_the_base_models(text_encoder):
    from diffunlearn.evaluate.classes import forget_probe as class_probe
    from diffunlearn.evaluate.world import forget_probe
    from diffunlearn.models import load_adapter

    digits, _ = load_adapter("embedded:digits", text_encoder=text_encoder)
    assert forget_probe(digits, "three", 16) >= 0.8  # the base model draws a three when asked
    assert forget_probe(digits, "three,red", 16) >= 0.8
    classes, _ = load_adapter("embedded:digits-class")
    assert class_probe(classes, 3, 16) >= 0.8  # 1 − UA of the base class model: its threes are threes


def test_a_real_run_stops_early_and_records_it(tmp_path):
    # GA at a large lr erases "three" (and the rest) within a few steps: the check at step 4 or 8 stops it.
    out = tmp_path / "run"
    assert main(["unlearn", "method=ga", "lr=1e-3", "steps=40", "num_pairs=16", "batch_size=8", "eval_prompts=8",
                 "early_stop_every=4", "early_stop_prompts=8", "threads=1", "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    stopped = results["training"]["early_stop_step"]
    assert stopped is not None and stopped % 4 == 0 and stopped < 40
    assert results["training"]["steps"] == stopped and results["training"]["probe_forget"] <= 0.05
    assert len((out / "metrics.jsonl").read_text().splitlines()) == stopped


@pytest.mark.parametrize("args, fragment", [
    (["model=/tmp/no-such-sd", "concept=nudity", "early_stop_every=5"], "is for the digit-world and embedded class"),
    (["method=uce", "early_stop_every=5"], "takes no gradient steps"),
    (["early_stop_every=5", "early_stop_score=1.5"], "`early_stop_score` is a forget score"),
    (["early_stop_every=-1"], "`early_stop_every` must be >= 0"),
])
def test_bad_early_stop_settings_are_refused(tmp_path, monkeypatch, capsys, args, fragment):
    monkeypatch.chdir(tmp_path)
    assert main(["unlearn", *args]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
