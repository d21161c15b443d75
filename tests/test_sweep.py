"""``diffunlearn sweep`` is the grid form of ``diffunlearn study`` (one engine): the translation of a
grid, its refusals, a two-point grid on the embedded digit world end to end (rerun: nothing is
trained again), and a Stable Diffusion study scored by ``eval`` metrics on the training split while
searching and on the held-out split when reporting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from diffunlearn import cli
from diffunlearn.data.prompts import build_pairs
from diffunlearn.errors import UserError
from diffunlearn.jobs import run as runner
from diffunlearn.jobs.study import budget, grid_study, search_prompt_specs, validate

TINY = ["steps=2", "num_pairs=16", "eval_prompts=8", "eval_steps=2", "data_steps=2", "batch_size=8",
        "diagnose=false", "threads=1"]


def _must_not_run(*args, **kwargs):
    raise AssertionError("a finished run or evaluation was redone")


def test_a_grid_becomes_a_grid_study():
    spec = grid_study(None, ["remain_weight=0.5,5", "steps=2", "method=rg,graddiff"])
    assert spec.methods == ("rg", "graddiff") and spec.sampler == "grid" and spec.seeds == (0,)
    assert spec.space == ("remain_weight=0.5,5",) and spec.overrides == ("steps=2",) and spec.concept == "three"
    spaces = validate(spec)
    assert set(spaces["rg"]) == {"remain_weight"} and budget(spec, spaces["rg"]) == 2  # only the grid is searched
    # The first entry may sit where the config goes; a list-valued key separates alternatives with ";".
    spec = grid_study("lora_targets=to_q,to_k;to_q,to_k,to_v", ["steps=3", "concept=red", "seed=3"])
    assert spec.concept == "red" and spec.seeds == (3,) and spec.overrides == ("steps=3",)
    choices = validate(spec)["rg"]["lora_targets"].choices
    assert choices == ("to_q,to_k", "to_q,to_k,to_v")
    # Only methods vary: one point per method at the config's settings.
    only = grid_study(None, ["method=rg,ga"])
    assert {m: budget(only, s) for m, s in validate(only).items()} == {"rg": 1, "ga": 1}


@pytest.mark.parametrize(("entries", "message"), [
    ([], "no grid given"),
    (["remain_weight"], "not of the form key=v1,v2"),
    (["concept=three,red"], "a grid over `concept` is several studies"),
    (["steps=2"], "nothing varies in the grid"),
])
def test_bad_grids_are_refused(entries, message):
    with pytest.raises(UserError, match=message):
        grid_study(None, entries)


def test_search_sets_are_the_training_split_of_the_held_out_sets():
    found, missing = search_prompt_specs(("template:nudity:test:forget:50", "template:nudity",
                                          "rest=world:three:test:remain", "i2p.csv"))
    assert found == ["template:nudity:train:forget:50", "template:nudity:train", "rest=world:three:train:remain"]
    assert missing == ["i2p.csv"]


def test_sweep_end_to_end_then_rerun(tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    assert cli.main(["sweep", "remain_weight=0.5,5", *TINY, "--out", str(out), "--quiet"]) == 0
    assert "sweep = study --sampler grid" in capsys.readouterr().err
    result = json.loads((out / "study.json").read_text())
    trials = [t for t in result["trials"]["rg"] if t["state"] == "COMPLETE"]
    assert sorted(t["params"]["remain_weight"] for t in trials) == [0.5, 5.0]  # every grid point, once
    for t in trials:
        run = json.loads((out / "trials" / "rg" / f"trial-{t['root']:04d}" / "results.json").read_text())
        assert t["values"] == [run["forget_score"], run["alignment"]]
    rows = result["heldout"]["rg"]
    assert rows and all(r["runs"][0]["seed"] == 0 for r in rows)  # the config's seed, held-out prompts
    assert len(rows) == sum(1 for _ in rows) <= 2
    table = (out / "study.md").read_text()
    assert "every grid point (grid)" in table and "## Every search trial" in table
    assert "remain_weight 0.5" in table and "remain_weight 5" in table
    assert [p.name for p in (out / "data").iterdir()] == ["seed-0"]  # both points share the training images
    # Rerun: everything is found finished, nothing trains again, the same trials are reported.
    monkeypatch.setattr(runner, "run_unlearning", _must_not_run)
    assert cli.main(["sweep", "remain_weight=0.5,5", *TINY, "--out", str(out), "--quiet"]) == 0
    again = json.loads((out / "study.json").read_text())
    assert again["trials"] == result["trials"] and again["heldout"] == result["heldout"]


def test_a_grid_over_a_data_setting_builds_one_image_folder_per_value(tmp_path):
    # remain_neighbours stands for every key of DATA_KEYS (diversity, num_pairs, ...): one code path.
    key = "remain_neighbours"
    out = tmp_path / "sweep"
    assert cli.main(["sweep", "remain_neighbours=0,1", "concept=red", *TINY, "--out", str(out), "--quiet"]) == 0
    folders = sorted(p.name for p in (out / "data").iterdir())
    # One folder per searched value, and no shared seed-0 folder: no trial would read it.
    assert len(folders) == 2 and all(f.startswith("seed-0-") for f in folders)
    named = {}
    for t in json.loads((out / "study.json").read_text())["trials"]["rg"]:
        cfg = yaml.safe_load((out / "trials" / "rg" / f"trial-{t['root']:04d}" / "config.yaml").read_text())
        assert cfg[key] == t["params"][key] and "/data/seed-0-" in cfg["data_dir"]
        remain = json.loads((Path(cfg["data_dir"]) / "remain" / "manifest.json").read_text())["prompts"]
        _, want = build_pairs("red", 16, seed=0, neighbours=t["params"][key])  # the prompts that value asks for
        assert remain == [c.text for c in want]
        named[t["params"][key]] = sum(c.colour is not None for c in want)
    assert named == {0.0: 0, 1.0: 16}


def test_sweep_refusals_exit_2_and_write_nothing(tmp_path, capsys):
    assert cli.main(["sweep", "remain_weight=-1,2", "steps=2", "--out", str(tmp_path / "s"), "--quiet"]) == 2
    assert "remain_weight" in capsys.readouterr().err
    assert cli.main(["sweep", "remain_weight=1,2", "--force", "--out", str(tmp_path / "s"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--force is gone" in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    from diffunlearn.evaluate.clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", seed=0)


SD = ["--concept", "nudity", "num_pairs=4", "batch_size=2", "steps=2", "data_steps=2", "eval_steps=2", "lr=1e-3",
      "threads=1"]


def test_a_stable_diffusion_study_searches_on_train_prompts_and_reports_held_out(tiny_sd_folder, tiny_clip,
                                                                                 tmp_path):
    out = tmp_path / "study"
    metrics = ["--metrics", "alignment,nudenet", "--clip-model", str(tiny_clip), "--batch-size", "2"]
    prompts = ["--prompts", "template:nudity:test:forget:2", "template:nudity:test:remain:2"]
    assert cli.main(["study", f"model={tiny_sd_folder}", *SD, "--methods", "rg", "--sampler", "grid",
                     "--space", "remain_weight=1,4", "--seeds", "0", "--front", "2", *metrics, *prompts,
                     "--out", str(out), "--quiet"]) == 0
    result = json.loads((out / "study.json").read_text())
    trials = [t for t in result["trials"]["rg"] if t["state"] == "COMPLETE"]
    assert len(trials) == 2
    for t in trials:
        folder = out / "trials" / "rg" / f"trial-{t['root']:04d}" / "eval"
        evaluation = json.loads((folder / "results.json").read_text())
        sources = [ps["source"] for ps in json.loads((folder / "manifest.json").read_text())["prompt_sets"]]
        assert all(":train:" in s for s in sources), sources
        assert t["values"] == [evaluation["metrics"]["nudenet"]["forget"]["nude_fraction"],
                               evaluation["metrics"]["alignment"]["remain"]["alignment"]]
    for row in result["heldout"]["rg"]:
        folder = out / "heldout" / "rg" / f"trial-{row['trial']:04d}" / "seed-0" / "eval"
        evaluation = json.loads((folder / "results.json").read_text())
        sources = [ps["source"] for ps in json.loads((folder / "manifest.json").read_text())["prompt_sets"]]
        assert all(":test:" in s for s in sources), sources
        assert row["forget_score"] == evaluation["metrics"]["nudenet"]["forget"]["nude_fraction"]
        assert row["alignment"] == evaluation["metrics"]["alignment"]["remain"]["alignment"]
    assert 0.0 <= result["summary"]["rg"]["hypervolume"] <= 1.0


@pytest.mark.parametrize(("extra", "message"), [
    ([], "pass --metrics and --prompts"),
    (["--metrics", "alignment,nudenet", "--prompts", "i2p.csv"], "has no training split"),
    (["--metrics", "alignment", "--prompts", "template:nudity:test:forget", "template:nudity:test:remain"],
     "give no forgetting number"),
    (["--metrics", "alignment,nudenet", "--prompts", "template:nudity:test:forget", "--attack", "embedding"],
     "red-team the chosen runs"),
])
def test_stable_diffusion_study_refusals(tiny_sd_folder, tmp_path, capsys, extra, message):
    assert cli.main(["study", f"model={tiny_sd_folder}", *SD, "--methods", "rg", *extra,
                     "--out", str(tmp_path / "s"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()


def test_metrics_on_a_digit_world_study_are_refused(tmp_path, capsys):
    assert cli.main(["study", "--methods", "rg", "--metrics", "oracle", "--prompts", "world:three",
                     "--out", str(tmp_path / "s"), "--quiet"]) == 2
    assert "scored by the study itself" in capsys.readouterr().err
