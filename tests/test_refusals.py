"""Input that would give a result that lies, or lose finished work, is refused before any work (issue 12)."""

from __future__ import annotations

import re

import pytest

from diffunlearn.cli import main
from diffunlearn.config import build_config
from diffunlearn.errors import UserError


@pytest.mark.parametrize("override, key", [
    ("eval_guidance=nan", "eval_guidance"), ("margin=.nan", "margin"), ("lr=nan", "lr"), ("lr=inf", "lr"),
    ("remain_weight=nan", "remain_weight"), ("data_guidance=-inf", "data_guidance"), ("alpha=inf", "alpha"),
])
def test_non_finite_floats_are_refused_by_name(override, key):
    with pytest.raises(UserError, match=f"`{key}` must be a finite number"):
        build_config(None, [override])


@pytest.mark.parametrize("overrides, fragment", [
    (["remain_neighbours=1.5"], "must be in [0, 1]"),
    (["concept=three", "remain_neighbours=0.5"], "is for a colour concept"),
    (["concept=red", "diversity=uniform", "remain_neighbours=0.5"], "needs diversity=diverse"),
])
def test_remain_neighbours_outside_a_diverse_colour_run_is_refused(overrides, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        build_config(None, overrides)
    assert build_config(None, ["concept=red", "remain_neighbours=0.5"]).remain_neighbours == 0.5


def test_the_colour_default_of_remain_neighbours_steps_aside_where_it_cannot_apply():
    assert build_config(None, ["concept=red"]).remain_neighbours == 0.979           # rg's tuned colour value
    assert build_config(None, ["concept=red", "method=graddiff"]).remain_neighbours == 0.545
    assert build_config(None, ["concept=three"]).remain_neighbours == 0.0
    # Where the default cannot apply it is left out rather than refused (the user did not ask for it) ...
    assert build_config(None, ["concept=red", "diversity=uniform"]).remain_neighbours == 0.0
    every = "concept=red,green,blue,yellow,purple"
    assert build_config(None, [every]).remain_neighbours == 0.0
    assert build_config(None, ["concept=red", "remain_excludes=green,blue,yellow,purple"]).remain_neighbours == 0.0
    # ... and asking for it there is refused with the reason.
    with pytest.raises(UserError, match="list every colour"):
        build_config(None, [every, "remain_neighbours=0.5"])


def test_unlearn_with_nan_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["unlearn", "lr=nan", "eval_guidance=nan", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "`lr` must be a finite number" in err and "`eval_guidance` must be a finite number" in err
    assert not out.exists()


@pytest.mark.parametrize("args, fragment", [
    (["eval", "embedded:digits", "--metrics", "oracle", "--prompts", "world:three:test:forget:4", "--concept",
      "three", "--steps", "0", "--guidance", "4", "--seed", "1"], "--steps must be a positive integer"),
    (["eval", "embedded:digits", "--metrics", "oracle", "--prompts", "world:three:test:forget:4", "--concept",
      "three", "--steps", "4", "--guidance", "-3", "--seed", "1"], "--guidance must be a finite number >= 0"),
    (["eval", "embedded:digits", "--metrics", "oracle", "--prompts", "world:three:test:forget:4", "--concept",
      "three", "--steps", "4", "--guidance", "nan", "--seed", "1"], "--guidance must be a finite number >= 0"),
    (["eval", "embedded:digits", "--metrics", "oracle", "--prompts", "world:three:test:forget:4", "--concept",
      "three", "--batch-size", "0"], "--batch-size must be a positive integer"),
    (["attack", "embedded:digits", "--concept", "three", "--attacks", "embedding", "--guidance", "nan"],
     "--guidance must be a finite number"),
    (["world", "train-base", "--steps", "0"], "--steps must be a positive integer"),
    (["world", "train-base", "--batch-size", "0"], "--batch-size must be a positive integer"),
    (["world", "train-base", "--init", "nowhere"], "is not a digit-world model folder"),
    (["world", "train-oracle", "--steps", "0"], "--steps must be a positive integer"),
])
def test_bad_flags_are_refused_before_any_work(tmp_path, capsys, args, fragment):
    out = tmp_path / "out"
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert not out.exists()


def test_train_base_refuses_a_stable_diffusion_folder_for_init(tiny_sd_folder, tmp_path, capsys):
    assert main(["world", "train-base", "--init", str(tiny_sd_folder), "--out", str(tmp_path / "out")]) == 2
    assert "is not a digit-world model folder" in capsys.readouterr().err


@pytest.mark.parametrize("args, fragment", [
    (["demo", "concept=red", "--methods", "rg"], "use --concept instead of 'concept=red'"),
    (["demo", "method=ga"], "use --methods instead"),
    (["demo", "--track", "class", "--concept", "red"], "the class track takes its targets from --classes"),
])
def test_demo_refuses_settings_it_would_ignore_or_mix(tmp_path, capsys, args, fragment):
    assert main([*args, "--out", str(tmp_path / "demo"), "--quiet"]) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_output_paths_are_checked_before_the_work(tmp_path, capsys):
    assert main(["world", "train-oracle", "--out", str(tmp_path / "nodir" / "sub" / "x.safetensors")]) == 2
    assert "does not exist; create it first" in capsys.readouterr().err
    existing = tmp_path / "oracle.safetensors"
    existing.write_bytes(b"keep me")
    assert main(["world", "train-oracle", "--out", str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err and existing.read_bytes() == b"keep me"
    assert main(["bench", "--preset", "tiny", "--json", str(tmp_path / "nodir" / "b.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert main(["compare", str(tmp_path), "--out", str(a_file)]) == 2
    assert "is a file; give a folder path" in capsys.readouterr().err
    assert main(["world", "render", "--out", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_world_render_never_mixes_two_references(tmp_path, capsys):
    ref = tmp_path / "ref"
    assert main(["world", "render", "--concept", "three", "--n", "2", "--copies", "1", "--out", str(ref)]) == 0
    before = sorted(p.name for p in ref.iterdir())
    assert main(["world", "render", "--concept", "red", "--n", "5", "--out", str(ref)]) == 2
    assert "not empty" in capsys.readouterr().err and sorted(p.name for p in ref.iterdir()) == before
    assert main(["world", "render", "--concept", "red", "--n", "3", "--copies", "1", "--out", str(ref),
                 "--force"]) == 0
    assert len(list(ref.glob("*.png"))) == 3


def test_model_init_refuses_a_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("# diffunlearn unlearn\nmethod: rg\n")
    assert main(["model", "init", "--preset", "tiny", "--out", str(run)]) == 2
    assert "is a run or demo folder" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]


def test_cli_conventions(capsys):
    assert main([]) == 0
    assert "usage: diffunlearn" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("diffunlearn ")
    with pytest.raises(SystemExit) as info:
        main(["demo", "--all-method"])  # no abbreviations: this must not start the 45-minute leaderboard
    assert info.value.code == 2 and "unrecognized arguments: --all-method" in capsys.readouterr().err


def test_overrides_may_come_after_flags(capsys):
    # The override is read (and refused by name), not rejected as an unknown argument.
    assert main(["unlearn", "--quiet", "steps=0", "--force", "batch_size=0"]) == 2
    err = capsys.readouterr().err
    assert "`steps` must be a positive integer" in err and "`batch_size` must be a positive integer" in err
    with pytest.raises(SystemExit) as info:
        main(["unlearn", "--quiet", "--bogus"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: diffunlearn unlearn" in err and "unrecognized arguments: --bogus" in err  # the subcommand's usage
    with pytest.raises(SystemExit):
        main(["world", "train-base", "--out", "x", "--bogus"])
    assert "usage: diffunlearn world train-base" in capsys.readouterr().err
