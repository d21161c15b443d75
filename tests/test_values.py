"""Values that would give a result that lies are refused before any work (issue 12, section 1)."""

from __future__ import annotations

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
