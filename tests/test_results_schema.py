"""Every run's results.json carries its scores in the ``diffunlearn eval`` schema (issue 14 §3), so
``compare`` reads one schema; run folders written before keep being translated."""

from __future__ import annotations

import json

import pytest

from diffunlearn.cli import main
from diffunlearn.jobs.compare import load_results

QUICK = ["steps=1", "eval_prompts=4", "eval_steps=2", "threads=1", "diagnose=false"]


def test_a_digit_run_records_the_oracle_schema_beside_its_flat_scores(tmp_path):
    run = tmp_path / "run"
    assert main(["unlearn", *QUICK, "num_pairs=8", "batch_size=4", "data_steps=2", "--out", str(run), "--quiet"]) == 0
    results = json.loads((run / "results.json").read_text())
    oracle = results["metrics"]["oracle"]
    assert oracle["forget"]["forget_score"] == results["forget_score"]
    assert oracle["remain"]["alignment"] == results["alignment"]
    assert oracle["remain"]["quality_fd"] == results["quality_fd"]
    assert {f"alignment_{k}" for k in results["alignment_per_attribute"]} < set(oracle["remain"])
    flat = load_results(run)
    assert flat["oracle/forget/forget_score"] == results["forget_score"]
    assert flat["oracle/remain/alignment_digit"] == results["alignment_per_attribute"]["digit"]
    # An explicit evaluation in RUN/eval is what compare reads, not the in-run scores.
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text(json.dumps({"metrics": {"oracle": {"forget": {"forget_score": 0.5}}}}))
    assert load_results(run) == {"oracle/forget/forget_score": 0.5}


def test_a_class_run_records_the_classifier_schema(tmp_path):
    run = tmp_path / "run"
    assert main(["unlearn", "model=embedded:digits-class", "concept=three", "remain_per_class=4", *QUICK,
                 "--out", str(run), "--quiet"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["metrics"]["classifier"]["forget"]["ua"] == results["ua"]
    assert results["metrics"]["classifier"]["remain"]["ra"] == results["ra"]
    flat = load_results(run)
    assert flat["classifier/forget/ua_complement"] == pytest.approx(1.0 - results["ua"])
    assert flat["oracle/remain/quality_fd"] == results["fd"]


def test_a_run_folder_from_before_the_schema_is_still_read(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"forget_score": 0.25, "alignment": 0.75, "quality_fd": 900.0}))
    assert load_results(run) == {"oracle/forget/forget_score": 0.25, "oracle/remain/alignment": 0.75,
                                 "oracle/remain/quality_fd": 900.0}
