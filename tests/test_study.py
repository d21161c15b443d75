"""``diffunlearn study`` (issue 13 §1): a short study end to end, resume after a killed worker with
no trial lost or run twice, the search space and the hypervolume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from diffunlearn.cli import main
from diffunlearn.errors import UserError
from diffunlearn.jobs.study import (
    Dimension,
    StudySpec,
    hypervolume,
    pareto,
    parse_space,
    rule_choice,
    run_study,
    summarise,
    validate,
)

FAST = ("steps=3", "num_pairs=8", "batch_size=4", "eval_prompts=4", "data_steps=2", "eval_steps=2",
        "diagnose=false", "threads=1")


def test_hypervolume_and_pareto_are_exact():
    assert hypervolume([[0.5, 0.5]]) == pytest.approx(0.25)
    assert hypervolume([[0.0, 0.5], [0.5, 0.0]]) == pytest.approx(0.75)
    assert hypervolume([[0.0, 0.5], [0.5, 0.0], [0.6, 0.6]]) == pytest.approx(0.75)  # a dominated point adds 0
    assert hypervolume([[0.5, 0.5, 0.5]]) == pytest.approx(0.125)
    assert hypervolume([[0.0, 0.0, 0.5], [0.5, 0.5, 0.0]]) == pytest.approx(0.5 + 0.25 - 0.125)
    assert pareto([[0.1, 0.9], [0.2, 0.95], [0.3, 0.8]], ["minimize", "maximize"]) == [True, True, False]


def _point(trial, train, heldout, train_fd):
    return {"trial": trial, "params": {}, "train_objectives": list(train), "train_quality_fd": train_fd,
            "forget_score": heldout[0], "alignment": heldout[1], "forget_score_std": 0.0, "alignment_std": 0.0}


def test_the_chosen_point_is_chosen_on_training_scores_never_held_out():
    spec = StudySpec(methods=("rg",))
    # Trial 2 looks better held out, but trial 1 is better on the training prompts: trial 1 is chosen.
    rows = {"rg": [_point(1, (0.0, 1.0), (0.04, 0.90), 900.0), _point(2, (0.0, 0.95), (0.0, 1.0), 800.0)]}
    chosen = summarise(spec, rows)["rg"]
    assert chosen["chosen"]["trial"] == 1 and chosen["reaches_forget_limit"]
    # A tie on the training objectives goes to the lower training FD, whatever the held-out numbers say.
    rows = {"rg": [_point(1, (0.0, 1.0), (0.0, 1.0), 2500.0), _point(2, (0.0, 1.0), (0.01, 0.99), 1800.0)]}
    assert summarise(spec, rows)["rg"]["chosen"]["trial"] == 2
    # Nothing forgets on the training prompts: the lowest training forget, and its held-out miss is reported.
    rows = {"rg": [_point(1, (0.3, 1.0), (0.01, 1.0), 500.0), _point(2, (0.2, 0.9), (0.4, 0.9), 500.0)]}
    entry = summarise(spec, rows)["rg"]
    assert entry["chosen"]["trial"] == 2 and not entry["reaches_forget_limit"]


def test_with_the_attack_as_an_objective_the_rule_takes_the_most_robust_point_that_keeps_alignment():
    from diffunlearn.jobs.study import ALIGN_TOLERANCE, rule_choice

    # (training forget, alignment, ASR): the relearning study of "three" in small. Trial 3 has the best
    # clean numbers; trial 0 forgets as well, keeps alignment within the tolerance and resists far better.
    points = {0: (0.01, 1.0, 0.094), 1: (0.01, 0.95, 0.078), 3: (0.0, 1.0, 0.297), 6: (0.01, 0.96, 0.922),
              4: (1.0, 1.0, 1.0)}
    assert ALIGN_TOLERANCE == 0.03
    assert rule_choice(list(points), lambda k: points[k]) == 0
    # Trial 1 resists best but gave up 0.05 of alignment: out. Without the attack, the clean rule: 3.
    assert rule_choice(list(points), lambda k: points[k][:2]) == 3
    # Through summarise, on the training objectives of the held-out rows (their held-out ASR is ignored).
    spec = StudySpec(methods=("rg",), objectives=("forget", "alignment", "attack"), attack="relearn")
    rows = {"rg": [{**_point(k, v, (0.0, 1.0), 900.0), "asr": 0.0 if k == 3 else 0.5} for k, v in points.items()]}
    assert summarise(spec, rows)["rg"]["chosen"]["trial"] == 0
    # Nothing forgets: the lowest training forget, whatever its attack success.
    far = {0: (0.3, 1.0, 0.9), 1: (0.2, 0.9, 1.0)}
    assert rule_choice(list(far), lambda k: far[k]) == 1


class _T:
    """A stand-in for Optuna's FrozenTrial, unhashable like it."""

    __hash__ = None

    def __init__(self, number, values):
        self.number, self.values, self.user_attrs = number, values, {}


def test_the_rule_choice_is_always_re_run_held_out():
    from diffunlearn.jobs.study import _select

    # The front of a search: the rule's pick (forget 0.01 <= 0.05 with the best alignment) lies inside it.
    front = [_T(7, [0.0, 0.74]), _T(0, [0.01, 0.99]), _T(5, [0.4, 0.995]), _T(3, [0.98, 1.0])]
    assert [t.number for t in _select(front, 1)] == [0]
    assert [t.number for t in _select(front, 2)] == [7, 0]      # the pick, then the front's low-forget end
    assert [t.number for t in _select(front, 3)] == [7, 0, 3]   # the pick, then both ends
    # 5/100 in float32 is 0.0500000007: it still forgets.
    assert [t.number for t in _select([_T(1, [0.05000000074505806, 0.75]), _T(2, [0.02, 0.6])], 1)] == [1]
    # A tie already re-run held out serves for the rule's pick (no runs repeated for a tie).
    from diffunlearn.jobs.study import prefer_ran

    a, b, c = _T(0, [0.0, 0.02]), _T(2, [0.0, 0.02]), _T(3, [0.1, 0.5])
    assert prefer_ran([a], [a, b, c], ran={2}) == [b] and prefer_ran([c], [a, b, c], ran={2}) == [c]
    assert prefer_ran([a, b], [a, b, c], ran={2}) == [b]
    # Nothing forgets: the lowest forget score.
    assert [t.number for t in _select([_T(1, [0.3, 0.9]), _T(2, [0.2, 0.5]), _T(4, [0.9, 1.0])], 1)] == [2]


def test_search_space_defaults_and_overrides():
    spec = StudySpec(methods=("rg", "ga", "esd-u"), space=("rg.margin=0.05,0.2", "lr=1e-4:1e-3:log"))
    spaces = validate(spec)
    assert set(spaces["rg"]) == {"lr", "remain_weight", "margin"}
    assert spaces["rg"]["margin"] == Dimension("choice", choices=(0.05, 0.2))
    assert spaces["ga"]["lr"] == Dimension("float", 1e-4, 1e-3, log=True) and "remain_weight" not in spaces["ga"]
    assert set(spaces["esd-u"]) == {"lr", "esd_eta"}  # ESD has no remain gradient
    fixed = validate(StudySpec(methods=("rg",), overrides=("margin=0.1",)))
    assert "margin" not in fixed["rg"]  # a fixed key is not searched
    with pytest.raises(UserError, match="unknown config key `lrr`"):
        parse_space(["lrr=1:2"], ("rg",))
    with pytest.raises(UserError, match="LOW < HIGH"):
        parse_space(["lr=1e-3:1e-4:log"], ("rg",))
    with pytest.raises(UserError, match="sets `seed` itself"):
        validate(StudySpec(methods=("rg",), overrides=("seed=3",)))
    with pytest.raises(UserError, match="--sampler grid needs a list"):
        validate(StudySpec(methods=("rg",), sampler="grid", space=("lr=1e-4:1e-3",)))
    with pytest.raises(UserError, match="searches only the --space lists"):
        validate(StudySpec(methods=("rg",), sampler="grid"))


def test_a_three_trial_study_end_to_end(tmp_path, capsys):
    out = tmp_path / "study"
    code = main(["study", *FAST, "--methods", "rg,graddiff", "--trials", "3", "--seeds", "0,1", "--front", "1",
                 "--out", str(out), "--quiet"])
    assert code == 0
    table = capsys.readouterr().out
    assert "| rg |" in table and "| graddiff |" in table
    result = json.loads((out / "study.json").read_text())
    for method in ("rg", "graddiff"):
        complete = [t for t in result["trials"][method] if t["state"] == "COMPLETE"]
        assert len(complete) == 3
        for t in complete:
            run = json.loads((out / "trials" / method / f"trial-{t['root']:04d}" / "results.json").read_text())
            assert t["values"] == [run["forget_score"], run["alignment"]]  # searched on the training prompts
            assert "eval_split: train" in (out / "trials" / method / f"trial-{t['root']:04d}" / "config.yaml"
                                           ).read_text()
        rows = result["heldout"][method]
        assert 1 <= len(rows) <= 2 and all(len(r["runs"]) == 2 for r in rows)
        for r in rows:
            assert r["forget_score"] == pytest.approx(sum(x["forget_score"] for x in r["runs"]) / 2)
            cfg = (out / "heldout" / method / f"trial-{r['trial']:04d}" / "seed-1" / "config.yaml").read_text()
            assert "eval_split: test" in cfg and "seed: 1" in cfg
        assert 0.0 <= result["summary"][method]["hypervolume"] <= 1.0
    assert (out / "front.png").stat().st_size > 0 and (out / "study.db").is_file()
    # Rerunning finds everything done: no new trial, same table.
    assert main(["study", *FAST, "--methods", "rg,graddiff", "--trials", "3", "--seeds", "0,1", "--front", "1",
                 "--out", str(out), "--quiet"]) == 0
    again = json.loads((out / "study.json").read_text())
    assert [len(again["trials"][m]) for m in ("rg", "graddiff")] == [3, 3]
    # The reported time is the study's, summed over both sessions, not the second (quick) one's.
    assert again["seconds"] > result["seconds"] > 10
    assert json.loads((out / "clock.json").read_text())["seconds"] == pytest.approx(again["seconds"], abs=1e-3)
    # --pick every-seed re-picks the same study from its own runs: nothing trains again, each held-out
    # model is scored on the training prompts, and the rule reads the mean over the seeds.
    from diffunlearn.jobs import run as runner

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    original, runner.run_unlearning = runner.run_unlearning, must_not_train
    try:
        assert main(["study", *FAST, "--methods", "rg,graddiff", "--trials", "3", "--seeds", "0,1", "--front", "1",
                     "--pick", "every-seed", "--out", str(out), "--quiet"]) == 0
    finally:
        runner.run_unlearning = original
    every = json.loads((out / "study.json").read_text())
    assert "--pick every-seed" in (out / "study.md").read_text()
    for method in ("rg", "graddiff"):
        searched = {t["root"]: t["values"] for t in every["trials"][method] if t["state"] == "COMPLETE"}
        for r in every["heldout"][method]:
            found = [json.loads((out / "heldout" / method / f"trial-{r['trial']:04d}" / f"seed-{s}" /
                                 "train_scores.json").read_text()) for s in (0, 1)]
            # Seed 0's held-out model has the search trial's weights, so it reads the trial's scores.
            assert [found[0]["forget_score"], found[0]["alignment"]] == searched[r["trial"]]
            assert r["train_seeds_objectives"] == pytest.approx(
                [(found[0][k] + found[1][k]) / 2 for k in ("forget_score", "alignment")])
        want = rule_choice(every["heldout"][method], lambda p: p["train_seeds_objectives"],
                           lambda p: p["train_seeds_quality_fd"])
        assert every["summary"][method]["chosen"]["trial"] == want["trial"]


def test_pick_every_seed_is_refused_where_there_are_no_training_prompts_to_score(tmp_path, capsys):
    for extra in (["model=embedded:digits-class"], ["--objectives", "forget,alignment,attack", "--attack",
                                                      "embedding"]):
        assert main(["study", *FAST, *extra, "--methods", "rg", "--trials", "1", "--pick", "every-seed",
                     "--out", str(tmp_path / "s"), "--quiet"]) == 2
        assert "--pick every-seed" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_a_killed_worker_loses_and_duplicates_no_trial(tmp_path, monkeypatch):
    import diffunlearn.jobs.study as study

    out = tmp_path / "study"
    argv = ["study", *FAST, "steps=12", "--methods", "rg", "--trials", "2", "--seeds", "0", "--front", "1",
            "--out", str(out), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    worker = subprocess.Popen([sys.executable, "-m", "diffunlearn.cli", *argv], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "trials" / "rg" / "trial-0000" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (first.is_file() and first.read_text().count("\n") >= 2):
        time.sleep(0.2)
    assert first.is_file(), "the worker never started its first trial"
    worker.send_signal(signal.SIGKILL)  # killed mid-trial: no chance to tidy up
    worker.wait()
    assert not (first.parent / "results.json").exists()
    # Restarted at once, while the dead worker's heartbeat still looks alive (grace 3 s here): the new
    # session runs its own new trial (1), then waits for trial 0 to go stale and runs it again under its
    # own number. (It used to finish with trial 0 still RUNNING, one trial short.)
    monkeypatch.setattr(study, "GRACE_SECONDS", 3)
    assert main(argv) == 0
    result = json.loads((out / "study.json").read_text())
    trials = result["trials"]["rg"]
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    assert len(complete) == 2 and sorted(t["root"] for t in complete) == [0, 1]
    assert [t["state"] for t in trials if t["number"] == 0] == ["FAIL"]
    assert not [t for t in trials if t["state"] == "RUNNING"]
    killed = next(t for t in trials if t["number"] == 0)
    rerun = next(t for t in complete if t["root"] == 0)
    assert rerun["params"] == killed["params"] and rerun["number"] != 0
    assert sorted(p.name for p in (out / "trials" / "rg").iterdir()) == ["trial-0000", "trial-0001"]
    # The resumed session's sampler does not replay the first session's draws: trial 1 is a new point.
    new = next(t for t in complete if t["root"] == 1)
    assert new["params"] != killed["params"]


def test_a_class_world_study_scores_one_minus_ua_and_ra(tmp_path):
    out = tmp_path / "class-study"
    spec = StudySpec(methods=("rg",), overrides=("model=embedded:digits-class", "steps=2", "batch_size=8",
                                                  "eval_prompts=4", "eval_steps=2", "remain_per_class=2",
                                                  "threads=1"),
                     trials=2, seeds=(0,), front=1)
    result = run_study(spec, out, progress=False)
    complete = [t for t in result["trials"]["rg"] if t["state"] == "COMPLETE"]
    assert len(complete) == 2 and not (out / "data").exists()  # class runs draw images, generate none
    run = json.loads((out / "trials" / "rg" / f"trial-{complete[0]['root']:04d}" / "results.json").read_text())
    assert complete[0]["values"] == [pytest.approx(1 - run["ua"]), pytest.approx(run["ra"])]
    held = result["heldout"]["rg"][0]["runs"][0]
    assert 0.0 <= held["forget_score"] <= 1.0 and "eval_seed: 7" in (
        out / "trials" / "rg" / f"trial-{complete[0]['root']:04d}" / "config.yaml").read_text()
    assert "1 − UA" in (out / "study.md").read_text()


def test_two_workers_share_one_study_without_losing_or_repeating_a_trial(tmp_path):
    out = tmp_path / "study"
    assert main(["study", *FAST, "--methods", "rg", "--trials", "3", "--seeds", "0", "--front", "1", "--workers", "2",
                 "--out", str(out), "--quiet"]) == 0
    trials = json.loads((out / "study.json").read_text())["trials"]["rg"]
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    # (a trial asked for at the very moment the budget filled up is recorded as PRUNED and never run)
    assert len(complete) == 3 and all(t["state"] in ("COMPLETE", "PRUNED") for t in trials)
    assert len({t["root"] for t in complete}) == 3 and all(t["worker"] for t in complete)
    assert len(list((out / "trials" / "rg").iterdir())) == 3
    # Each worker samples its own sequence: no two trials propose the same settings.
    assert len({json.dumps(t["params"], sort_keys=True) for t in complete}) == 3


def test_an_attacked_study_plots_the_attack_success_beside_the_clean_front(tmp_path):
    from PIL import Image

    from diffunlearn.jobs.study import front_plot

    rows = {"rg": [{**_point(0, (0.0, 1.0), (0.01, 0.97), 900.0), "asr": 0.3, "asr_std": 0.1},
                   {**_point(3, (0.0, 1.0), (0.0, 1.0), 900.0), "asr": 0.4, "asr_std": 0.05}]}
    front_plot(rows, tmp_path / "clean.png", "three")
    front_plot(rows, tmp_path / "attacked.png", "three", "relearn")
    clean, attacked = (Image.open(tmp_path / f"{n}.png").size for n in ("clean", "attacked"))
    assert clean == (780, 540) and attacked == (1440, 540)   # a second panel: ASR against forget
    # and the search-trial table shows each trial's own (training) attack success and its 3-objective front
    from diffunlearn.jobs.study import report

    spec = StudySpec(methods=("rg",), objectives=("forget", "alignment", "attack"), attack="relearn")
    trials = {"rg": [{"state": "COMPLETE", "root": 0, "params": {"lr": 1e-4}, "values": [0.01, 1.0, 0.09]},
                     {"state": "COMPLETE", "root": 3, "params": {"lr": 6e-5}, "values": [0.0, 1.0, 0.30]},
                     {"state": "COMPLETE", "root": 4, "params": {"lr": 1e-5}, "values": [1.0, 1.0, 1.0]}]}
    text = report(spec, rows, summarise(spec, rows), "study ...", tmp_path, 60.0, trials)
    assert "| method | trial | settings | forget ↓ | alignment ↑ | ASR relearn ↓ | front |" in text
    assert "| rg | 0 | lr 0.0001 | 0.010 | 1.000 | 0.090 | ✓ |" in text   # on the front only by its ASR
    assert "| rg | 4 | lr 1e-05 | 1.000 | 1.000 | 1.000 |  |" in text


def test_a_method_whose_defaults_change_the_data_gets_its_own_image_folder(tmp_path, monkeypatch):
    """A red study of ga and GradDiff: GradDiff's colour default names the colour's neighbours in its
    remain set (remain_neighbours 0.545), ga's does not, so GradDiff's runs may not train on the shared
    folder the first method's settings built."""
    import diffunlearn.jobs.data_build as data_build
    from diffunlearn.jobs.study import ensure_data

    built = {}
    monkeypatch.setattr(data_build, "build_data", lambda cfg, folder, *a: built.setdefault(folder.name, cfg))
    spec = StudySpec(methods=("ga", "graddiff"), concept="red")
    shared = ensure_data(spec, tmp_path, 0, False, "test", method="ga")
    own = ensure_data(spec, tmp_path, 0, False, "test", method="graddiff")
    assert shared.name == "seed-0" and own.name.startswith("seed-0-") and own != shared
    assert built["seed-0"].remain_neighbours == 0.0 and built[own.name].remain_neighbours == 0.545
    assert ensure_data(spec, tmp_path, 0, False, "test") == shared  # no method: the shared folder
    # A method whose data settings equal the first method's shares its folder ("three": no neighbours).
    three = StudySpec(methods=("ga", "graddiff"), concept="three")
    assert ensure_data(three, tmp_path / "t", 0, False, "test", method="graddiff").name == "seed-0"


def test_pick_auto_is_every_seed_where_that_rule_can_choose_and_first_seed_elsewhere():
    from diffunlearn.jobs.study import StudySpec, resolve

    def picked(**fields):
        return resolve(StudySpec(methods=("rg",), concept="three", **fields)).pick

    assert StudySpec(methods=("rg",)).pick == "auto"
    assert picked(front=2, seeds=(0, 1, 2)) == "every-seed"
    assert picked(front=1, seeds=(0, 1, 2)) == "first-seed"   # one front point: both rules pick it
    assert picked(front=2, seeds=(0,)) == "first-seed"        # one seed: the trial's model is the only one
    assert picked(front=2, objectives=("forget", "alignment", "attack"), attack="embedding") == "first-seed"
    assert picked(front=2, overrides=("model=embedded:digits-class",)) == "first-seed"  # no training prompts
    assert picked(front=2, pick="first-seed") == "first-seed"  # asked for: kept
    assert picked(front=1, pick="every-seed") == "every-seed"
