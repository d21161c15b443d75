"""The embedded leaderboard: mean ± std over seeds of per-seed demo summaries, resumable."""

from __future__ import annotations

import json
import statistics

from diffunlearn.jobs.leaderboard import leaderboard_table, run_leaderboard


def test_table_arithmetic_on_hand_made_runs():
    runs = {"three": {"rg": [{"forget_score": 0.0, "alignment": 1.0, "quality_fd": 100.0, "seconds": 10.0},
                             {"forget_score": 0.2, "alignment": 0.8, "quality_fd": 300.0, "seconds": 30.0}]}}
    table = leaderboard_table(runs)
    assert "| three | rg | 0.100 ± 0.141 | 0.900 ± 0.141 | 200 ± 141 | 20 ± 14 | 2 |" in table


def test_two_seed_leaderboard_end_to_end_red_teamed_and_resumed(tmp_path, monkeypatch):
    out = tmp_path / "board"
    small = ["steps=2", "num_pairs=16", "eval_prompts=8", "batch_size=8", "eval_steps=6", "data_steps=6"]
    table = run_leaderboard(out, ("ga", "rg"), ("three",), (0, 1), small, progress=False)
    summaries = [json.loads((out / f"three-seed{s}" / "summary.json").read_text()) for s in (0, 1)]
    fs = [s["methods"]["rg"]["forget_score"] for s in summaries]
    assert f"{statistics.fmean(fs):.3f} ± {statistics.stdev(fs):.3f}" in table.split("| three | rg |")[1]
    assert summaries[0]["settings"]["rg"]["seed"] == 0 and summaries[1]["settings"]["rg"]["data_seed"] == 1
    saved = json.loads((out / "leaderboard.json").read_text())
    assert set(saved["results"]["three"]) == {"base", "ga", "rg", "retrained (gold)"}
    assert len(saved["results"]["three"]["rg"]) == 2
    # The gold standard (retrained without threes) is evaluated once on the same held-out prompts.
    (gold,) = saved["results"]["three"]["retrained (gold)"]
    assert gold["forget_score"] <= 0.125 and gold["alignment"] >= 0.75
    assert "| three | retrained (gold) |" in table
    assert "Embedded leaderboard" in (out / "leaderboard.md").read_text()

    import diffunlearn.jobs.leaderboard as lb

    def refuse(*args, **kwargs):
        raise AssertionError("a finished (concept, seed) was run again")

    monkeypatch.setattr(lb, "run_demo", refuse)
    assert run_leaderboard(out, ("ga", "rg"), ("three",), (0, 1), small, progress=False) == table

    # Red-teaming the same board (seed 0; run_demo still refuses): every model's report, reused on a rerun.
    red = run_leaderboard(out, ("ga", "rg"), ("three",), (0,), small, progress=False, attacks=("paraphrase",))
    saved = json.loads((out / "leaderboard.json").read_text())
    for name in ("base", "ga", "rg"):
        report = json.loads((out / "three-seed0" / "attacks" / name / "results.json").read_text())
        asr = report["attacks"]["paraphrase"]["asr"]["oracle"]
        assert saved["results"]["three"][name][0]["asr"]["paraphrase"] == asr
    assert "ASR paraphrase ↓" in red and saved["attacks"] == ["paraphrase"]
    import diffunlearn.jobs.attack as job

    def refuse_attack(*args, **kwargs):
        raise AssertionError("a finished red-team report was run again")

    monkeypatch.setattr(job, "run_attack_job", refuse_attack)
    assert run_leaderboard(out, ("ga", "rg"), ("three",), (0,), small, progress=False, attacks=("paraphrase",)) == red

    # Changed settings (here: lr) make the finished demos stale: each is redone (the demo itself then
    # reuses every method folder whose config did not change).
    calls = []

    def record(concept, folder, methods, overrides, *args, **kwargs):
        calls.append((folder.name, overrides[-3]))
        return summaries[0]

    monkeypatch.setattr(lb, "run_demo", record)
    run_leaderboard(out, ("ga", "rg"), ("three",), (0, 1), [*small, "lr=1e-4"], progress=False)
    assert calls == [("three-seed0", "lr=1e-4"), ("three-seed1", "lr=1e-4")]
    assert not (out / "three-seed0" / "summary.json").exists()


def test_same_config_treats_keys_added_later_as_their_defaults():
    from diffunlearn.config import build_config
    from diffunlearn.jobs.runfolder import same_config

    cfg = build_config(None, ["method=rg", "steps=7"])
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("images", "remain_per_class", "remain_classes")}
    assert same_config(old, cfg)                       # recorded before those keys existed
    assert not same_config({**old, "steps": 8}, cfg)
    assert not same_config({**old, "mystery": 1}, cfg)
    changed = build_config(None, ["method=rg", "steps=7", "remain_per_class=9"])
    assert not same_config(old, changed)               # the old run used the default 50


def test_asr_columns_are_mean_and_std_over_seeds():
    runs = {"three": {"rg": [{"forget_score": 0.0, "alignment": 1.0, "quality_fd": 100.0, "seconds": 10.0,
                              "asr": {"embedding": 0.5}},
                             {"forget_score": 0.2, "alignment": 0.8, "quality_fd": 300.0, "seconds": 30.0,
                              "asr": {"embedding": 0.7}}]}}
    table = leaderboard_table(runs, ("embedding", "relearn"))
    assert "| ASR embedding ↓ | ASR relearn ↓ | seeds |" in table
    assert "| 20 ± 14 | 0.600 ± 0.141 | - | 2 |" in table

