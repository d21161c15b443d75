"""Run folders that cannot lie or lose work (issue 12 §2-§5): model kinds read from the folder,
paths stored resolved, resume that says what it does and sums its time, train-base checkpoints,
machine-readable stdout, the config listing."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from diffunlearn.cli import main
from diffunlearn.config import FIELDS, build_config, field_comments, model_kind
from diffunlearn.errors import UserError

# A few-second digit-world run on the tiny pixel model of the fixtures.
QUICK = ["concept=three", "steps=3", "num_pairs=8", "batch_size=4", "eval_prompts=4", "data_steps=2", "eval_steps=2",
         "diagnose=false", "lr=1e-3"]


@pytest.fixture()
def pixel_folder(tiny_adapter, tmp_path):
    folder = tmp_path / "digit-model"
    tiny_adapter.save(folder)
    return folder


def test_a_digit_world_folder_is_unlearned_as_a_digit_world_model(pixel_folder, tmp_path, capsys):
    assert model_kind(str(pixel_folder)) == "pixel"
    cfg = build_config(None, [f"model={pixel_folder}", "concept=three"])
    embedded = build_config(None, ["concept=three"])  # the digit world's recipe
    assert (cfg.lr, cfg.remain_weight, cfg.steps) == (embedded.lr, embedded.remain_weight, embedded.steps)
    out = tmp_path / "run"
    assert main(["unlearn", f"model={pixel_folder}", *QUICK, "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    shown = json.loads(captured.out)  # stdout is the JSON alone
    assert 0.0 <= shown["forget_score"] <= 1.0 and shown["training"]["steps"] == 3
    assert f"wrote {out}" in captured.err
    env = json.loads((out / "environment.json").read_text())
    assert env["world_size"] == 1 and env["device"] == "cpu" and env["torch_threads"] >= 1


def test_a_corrupt_model_index_is_reported_as_corrupt(tmp_path, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_diffunlearn_adapter": "class", ')
    assert main(["unlearn", f"model={folder}", "concept=three", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "model_index.json is corrupt" in err and "unknown concept" not in err
    assert not (tmp_path / "run").exists()


def test_a_folder_that_is_not_a_model_is_named_as_such(tmp_path):
    with pytest.raises(UserError, match="has no model_index.json, so it is not a model folder") as info:
        build_config(None, [f"model={tmp_path}", "concept=three"])
    assert "unknown concept" not in str(info.value)


def test_config_paths_are_stored_resolved(pixel_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(pixel_folder.parent)
    cfg = build_config(None, [f"model={pixel_folder.name}", "concept=three"])
    assert cfg.model == str(pixel_folder.resolve())
    # An older config.yaml with a path relative to its own folder is still read right from elsewhere.
    run = tmp_path / "old-run"
    run.mkdir()
    (run / "config.yaml").write_text(f"model: ../{pixel_folder.name}\nconcept: three\n")
    monkeypatch.chdir(tmp_path.parent)
    assert build_config(run / "config.yaml").model == str(pixel_folder.resolve())


def test_unknown_keys_get_a_suggestion_not_the_key_list():
    with pytest.raises(UserError) as info:
        build_config(None, ["lrr=1", "remain_wieght=2"])
    text = str(info.value)
    assert "unknown key `lrr` (did you mean `lr`?)" in text
    assert "unknown key `remain_wieght` (did you mean `remain_weight`?)" in text
    assert text.count("diffunlearn config") == 1 and "known keys" not in text


def test_config_command_prints_a_commented_yaml_that_loads_back(tmp_path, capsys):
    comments = field_comments()
    assert all(comments.get(name) for name in FIELDS)  # every key documented
    assert main(["config", "method=graddiff", "threads=1"]) == 0
    text = capsys.readouterr().out
    assert "remain_weight: 4.89" in text and "# λ in d = δ_f + λ·δ_r" in text
    (tmp_path / "c.yaml").write_text(text)
    assert build_config(tmp_path / "c.yaml") == build_config(None, ["method=graddiff", "threads=1"])


def test_resume_refuses_folders_that_are_not_runs(pixel_folder, tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["data", "build", f"model={pixel_folder}", *QUICK, "--out", str(data), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["unlearn", "--resume", str(data)]) == 2
    assert "is a `data build` folder, not a run" in capsys.readouterr().err
    assert not (data / "metrics.jsonl").exists() and not (data / "model").exists()
    assert main(["unlearn", "--resume", str(pixel_folder)]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_an_early_interruption_leaves_a_resumable_run_and_says_how(pixel_folder, tmp_path, capsys, monkeypatch):
    import diffunlearn.tasks.prompts as prompts_task

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "run"
    monkeypatch.setattr(prompts_task, "build_training_data", interrupted)  # Ctrl-C while the images are made
    assert main(["unlearn", f"model={pixel_folder}", *QUICK, "--out", str(out), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert f"continue with: diffunlearn unlearn --resume {out}" in err
    assert (out / "config.yaml").is_file() and (out / "environment.json").is_file()
    monkeypatch.undo()
    assert main(["unlearn", "--resume", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "starts over at step 1 of 3" in err
    assert json.loads((out / "results.json").read_text())["training"]["steps"] == 3


def test_resume_says_its_step_and_sums_the_training_time(pixel_folder, tmp_path, capsys, monkeypatch,
                                                          crash_after_checkpoint):
    import diffunlearn.core.training as training

    out = tmp_path / "run"
    crash_after_checkpoint(training, "save_checkpoint", at_step=2)
    assert main(["unlearn", f"model={pixel_folder}", *QUICK, "steps=4", "checkpoint_every=1", "--out", str(out),
                 "--quiet"]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["unlearn", "--resume", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "resuming from the checkpoint of step 2" in err and "continuing at step 3 of 4" in err
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    seconds = json.loads((out / "results.json").read_text())["training"]["seconds"]
    # Both sessions count: at least the time of all four steps, the first two from the first session.
    assert seconds >= sum(r["seconds"] for r in records) * 0.999
    assert records[-1]["elapsed_seconds"] == pytest.approx(seconds)
    assert records[2]["elapsed_seconds"] > records[1]["elapsed_seconds"]
    from pathlib import Path

    from diffunlearn.core.training import resume_message

    last = resume_message(4, 4, Path("ckpt"))     # a checkpoint of the last step: nothing left to train
    assert "last of 4 steps" in last and "training is complete" in last and "step 5" not in last


def test_an_update_that_poisons_the_weights_stops_before_a_checkpoint_takes_it(text_encoder, tmp_path,
                                                                                monkeypatch):
    import diffunlearn.core.training as training
    from diffunlearn.core.checkpoints import latest_checkpoint
    from diffunlearn.methods import get_method
    from test_methods import fresh_adapter, tiny_data

    real = training.make_optimizer

    def poisoning_optimizer(cfg, params):  # fault injection: step 2's update turns one weight into inf
        optimizer = real(cfg, params)
        step = optimizer.step

        def poisoned_step(*a, **k):
            result = step(*a, **k)
            if optimizer.state[params[0]]["step"] == 2:
                with torch.no_grad():
                    params[0].view(-1)[0] = float("inf")
            return result

        optimizer.step = poisoned_step
        return optimizer

    monkeypatch.setattr(training, "make_optimizer", poisoning_optimizer)
    cfg = build_config(None, ["method=graddiff", "steps=3", "batch_size=4", "checkpoint_every=1"])
    adapter = fresh_adapter(text_encoder)
    with pytest.raises(training.TrainingDiverged, match=r"step 2: the update made weights NaN/inf; lower `lr` "
                       r"\(now 0.000125\) or `remain_weight`.*step-000001"):
        training.unlearn(adapter, get_method("graddiff"), cfg, *tiny_data(adapter), progress=False,
                         checkpoint_dir=tmp_path / "ckpt")
    assert latest_checkpoint(tmp_path / "ckpt").name == "step-000001"  # the poisoned step never reached disk


@pytest.mark.parametrize("override", ["lr=1e39", "remain_weight=-1e39", "margin=1e300"])
def test_floats_beyond_float32_are_refused(override):
    key = override.split("=")[0]
    with pytest.raises(UserError, match=f"`{key}` must be"):
        build_config(None, [override])


def test_template_prompts_on_a_digit_model_are_refused(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "embedded:digits", "--metrics", "oracle", "--concept", "three", "--prompts",
                 "template:nudity:test:forget:4", "--out", str(out)]) == 2
    assert "is a Stable Diffusion prompt set, but this is a digit-world model" in capsys.readouterr().err
    assert not out.exists()


def test_metric_requirements_are_checked_before_any_image(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "embedded:digits", "--metrics", "oracle", "--prompts", "world:three:test:forget:4",
                 "--out", str(out)]) == 2
    assert "needs the forgotten concept; pass --concept" in capsys.readouterr().err
    assert not (out / "images").exists()


def test_fp16_on_the_cpu_is_warned_about(pixel_folder, tmp_path, capsys):
    assert main(["unlearn", f"model={pixel_folder}", *QUICK, "steps=1", "mixed_precision=bf16", "--out",
                 str(tmp_path / "run"), "--quiet"]) == 0
    assert "warning: mixed_precision=bf16 on the CPU is much slower" in capsys.readouterr().err


def test_threads_setting_is_applied(pixel_folder, tmp_path):
    before = torch.get_num_threads()
    try:
        assert main(["unlearn", f"model={pixel_folder}", *QUICK, "steps=1", "threads=1", "--out",
                     str(tmp_path / "run"), "--quiet"]) == 0
        assert torch.get_num_threads() == 1
        assert json.loads((tmp_path / "run" / "environment.json").read_text())["torch_threads"] == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(UserError, match="`threads` must be >= 0"):
        build_config(None, ["threads=-1"])


def test_every_flag_says_what_it_does():
    import argparse

    from diffunlearn.cli import build_parser

    def parsers(p):
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    yield from parsers(child)

    missing = [f"{p.prog} {'/'.join(a.option_strings) or a.dest}" for p in parsers(build_parser())
               for a in p._actions if not a.help and not isinstance(a, argparse._SubParsersAction)]
    assert missing == []
    help_text = build_parser()._subparsers._group_actions[0].choices["eval"].format_help()
    assert "class:NAME" in help_text and "NAME=SPEC" in help_text and "(default: 8)" in help_text


def test_only_the_main_process_prints(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert main(["methods"]) == 0
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["methods"]) == 0
    assert "rg" in capsys.readouterr().out


def test_train_base_checkpoints_and_resumes_to_the_same_weights(tmp_path, monkeypatch, crash_after_checkpoint):
    from safetensors.torch import load_file

    import diffunlearn.worlds.base_model as base_model

    small = dict(steps=4, batch_size=4, pool_size=16, eval_every=100, eval_prompts=4, checkpoint_every=2,
                 progress=False)
    base_model.train_base(tmp_path / "straight", **small)
    assert not (tmp_path / "straight" / "checkpoint").exists()  # removed once finished

    crash_after_checkpoint(base_model, "save_recipe_checkpoint")
    with pytest.raises(KeyboardInterrupt):
        base_model.train_base(tmp_path / "resumed", **small)
    monkeypatch.undo()
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2 and state["args"]["pool_size"] == 16
    final = base_model.train_base(tmp_path / "resumed", **small, resume=True)
    a = load_file(str(tmp_path / "straight" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert final["step"] == 4


def test_train_base_resume_flags(tmp_path, capsys):
    out = tmp_path / "base"
    assert main(["world", "train-base", "--out", str(out), "--resume"]) == 2
    assert "has no checkpoint to resume" in capsys.readouterr().err
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "state.json").write_text(json.dumps({"step": 2, "track": "text", "args": {}}))
    assert main(["world", "train-base", "--out", str(out)]) == 2
    assert "holds an interrupted training; continue it with" in capsys.readouterr().err
    assert main(["world", "train-base", "--out", str(out), "--resume", "--steps", "9"]) == 2
    assert "drop --steps" in capsys.readouterr().err
    assert main(["world", "train-base", "--track", "class", "--out", str(out), "--resume"]) == 2
    assert "interrupted text-track training" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("method: rg\n")
    assert main(["world", "train-base", "--out", str(run)]) == 2
    assert "is a run or demo folder" in capsys.readouterr().err


def test_bench_defaults_to_the_tiny_preset_and_measures_digit_models(capsys, monkeypatch):
    from pathlib import Path

    import diffunlearn.jobs.bench as bench

    seen = {}

    def record_preset(preset, folder, seed=0, dtype=None, device=None):  # stands in for building the weights
        seen.update(preset=preset, dtype=dtype, device=device)
        return folder

    monkeypatch.setattr("diffunlearn.models.presets.init_pipeline", record_preset)
    assert bench.bench_model_folder(None, None, Path("/tmp/w")) == "/tmp/w/tiny"
    assert seen == {"preset": "tiny", "dtype": None, "device": None}    # the CPU here; fp32
    bench.bench_model_folder("flux-dev", None, Path("/tmp/w"), dtype="bf16")
    assert seen["dtype"] == "bf16"    # a bf16 bench saves its random weights in bf16 (FLUX.1-dev: 33 GB)
    # (A bench of the digit model itself runs in tests/test_multi_concept.py, with three concepts.)
    with pytest.raises(UserError, match="class-conditional model"):
        bench.run_bench("embedded:digits-class", ("rg",), progress=False)


def test_a_data_build_folder_config_is_not_mistaken(pixel_folder, tmp_path):
    # (kept beside the resume tests: the data folder's own config.yaml reads back with resolved paths)
    data = tmp_path / "d"
    assert main(["data", "build", f"model={pixel_folder}", *QUICK, "--out", str(data), "--quiet"]) == 0
    loaded = yaml.safe_load((data / "config.yaml").read_text())
    assert os.path.isabs(loaded["model"])


@pytest.mark.parametrize("args", [
    ["eval", "embedded:digits", "--metrics", "oracle", "--concept", "three", "--prompts", "world:three:test:forget:2"],
    ["attack", "embedded:digits", "--concept", "three", "--attacks", "paraphrase"],
    ["data", "build", "steps=1"],
    ["sweep", "steps=1,2"],
])
def test_an_output_folder_that_is_a_file_is_refused(tmp_path, capsys, args):
    target = tmp_path / "a-file"
    target.write_text("precious")
    assert main([*args, "--out", str(target), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and "Traceback" not in err
    assert target.read_text() == "precious"


def test_the_class_recipe_resumes_to_the_same_weights_too(tmp_path, monkeypatch, crash_after_checkpoint):
    from safetensors.torch import load_file

    import diffunlearn.worlds.base_model as base_model
    from diffunlearn.worlds.class_digits import train_class_base

    small = dict(steps=4, batch_size=8, eval_every=100, eval_per_class=1, checkpoint_every=2, progress=False)
    train_class_base(tmp_path / "straight", **small)
    crash_after_checkpoint(base_model, "save_recipe_checkpoint")
    with pytest.raises(KeyboardInterrupt):
        train_class_base(tmp_path / "resumed", **small)
    monkeypatch.undo()
    train_class_base(tmp_path / "resumed", **small, resume=True)
    a = load_file(str(tmp_path / "straight" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert sorted(a) == sorted(b) and all(a[k].equal(b[k]) for k in a)


def test_an_interrupted_job_with_a_timestamped_default_folder_names_it_in_the_hint(tmp_path, capsys, monkeypatch):
    import diffunlearn.jobs.suite as suite

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(suite, "evaluate", interrupted)
    assert main(["eval", "embedded:digits", "--metrics", "oracle", "--concept", "three", "--prompts",
                 "world:three:test:forget:2"]) == 130
    err = capsys.readouterr().err
    assert "continue with: diffunlearn eval embedded:digits" in err and "--out evals/embedded:digits-" in err
