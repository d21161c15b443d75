"""The class-conditional track end to end: config, UA/RA arithmetic, `unlearn` on a user's model and
images, the `class:` prompt sets, compare/study rows and the reduced Table-1 demo."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from diffusers import DDPMScheduler  # noqa: E402

from diffunlearn.cli import main  # noqa: E402
from diffunlearn.config import CLASS_DEFAULTS, CLASS_WORLD_DEFAULTS, EMBEDDED_CLASS, build_config, model_kind  # noqa: E402
from diffunlearn.data.classes import ClassDataset, write_npz  # noqa: E402
from diffunlearn.errors import UserError  # noqa: E402
from diffunlearn.evaluate.classes import remain_labels  # noqa: E402
from diffunlearn.evaluate.classifier import remaining_accuracy, unlearning_accuracy  # noqa: E402
from diffunlearn.evaluate.prompt_sets import resolve_prompt_sets  # noqa: E402
from diffunlearn.models import load_adapter  # noqa: E402
from diffunlearn.models.classcond import ClassConditionalAdapter, build_class_unet  # noqa: E402

CLASSES = ("ant", "bee", "cat", "dog")


@pytest.fixture(scope="module")
def class_world(tmp_path_factory):
    """A tiny class-conditional model folder (8x8, 4 classes + null) and an .npz of 12 images per class."""
    root = tmp_path_factory.mktemp("class-world")
    unet = build_class_unet(len(CLASSES), sample_size=8, channels=3, block_out_channels=(8, 16), seed=0)
    adapter = ClassConditionalAdapter(unet, DDPMScheduler(num_train_timesteps=100), CLASSES)
    adapter.save(root / "model")
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(len(CLASSES)).repeat_interleave(12)
    images = (torch.rand(len(labels), 3, 8, 8, generator=gen) * 2 - 1)
    images += labels.view(-1, 1, 1, 1) * 0.1  # classes differ a little, like real data
    data = ClassDataset(images=images.clamp(-1, 1), labels=labels, class_names=CLASSES, source="test")
    write_npz(root / "data.npz", data)
    return root


def names(labels: list[int]) -> list[str]:
    return [str(i) for i in labels]


def test_ua_ra_arithmetic_on_hand_made_predictions():
    # The class track's UA/RA are the classifier metric's (one implementation; labels as class names).
    predicted_forget = names([3, 3, 1, 0, 3, 7, 3, 2])   # 4 of 8 still read as class 3
    assert unlearning_accuracy(predicted_forget, "3") == pytest.approx(0.5)
    assert unlearning_accuracy(names([1, 2]), "3") == 1.0
    labels = names([0, 1, 2, 4, 5, 6])
    predicted = names([0, 1, 9, 4, 5, 0])                  # 4 of 6 right
    assert remaining_accuracy(predicted, labels) == pytest.approx(4 / 6)
    assert math.isnan(unlearning_accuracy([], "3"))
    rest = remain_labels(3, 10, 20)
    assert 3 not in rest.tolist() and len(rest) == 20
    assert torch.bincount(rest, minlength=10).tolist() == [3, 3, 2, 0, 2, 2, 2, 2, 2, 2]


def test_config_detects_class_models_and_applies_their_recipe(class_world):
    folder = str(class_world / "model")
    assert model_kind(folder) == "class" and model_kind(EMBEDDED_CLASS) == "class"
    assert model_kind("embedded:digits") == "pixel" and model_kind("no/such/folder") == "text"
    cfg = build_config(None, [f"model={folder}", "concept=bee"])
    assert (cfg.lr, cfg.batch_size, cfg.steps, cfg.remain_weight) == (1e-5, 64, 782, 5.0)
    assert (cfg.forget_cap, cfg.alpha) == ("elementwise", 0.1) == (CLASS_DEFAULTS["forget_cap"], 0.1)
    world = build_config(None, [f"model={EMBEDDED_CLASS}", "concept=seven", "method=graddiff"])
    assert (world.steps, world.lr, world.eval_steps) == (CLASS_WORLD_DEFAULTS["steps"], CLASS_WORLD_DEFAULTS["lr"], 20)
    # rg (the default method) and rgd take the class study's pick over the shared recipe, on the
    # embedded world only: a user's class model keeps the reference recipe, and key=value still wins
    for method in ("rg", "rgd"):
        own = build_config(None, [f"model={EMBEDDED_CLASS}", "concept=seven", f"method={method}"])
        assert (own.lr, own.remain_weight, own.steps) == (7.5e-5, 10.2, CLASS_WORLD_DEFAULTS["steps"])
    assert build_config(None, [f"model={folder}", "concept=bee", "method=rg"]).lr == 1e-5
    assert build_config(None, [f"model={EMBEDDED_CLASS}", "concept=seven", "lr=2e-4"]).lr == 2e-4
    with pytest.raises(UserError, match="unknown class 'dragon'"):
        build_config(None, [f"model={EMBEDDED_CLASS}", "concept=dragon"])
    with pytest.raises(UserError, match="does not apply to a class-conditional UNet"):
        build_config(None, [f"model={folder}", "selection=lora"])


def test_class_prompt_sets():
    forget, remain = resolve_prompt_sets(["class:airplane:3", "class:bird, cat:2"])
    assert (forget.name, forget.prompts) == ("forget", ["airplane"] * 3)
    assert (remain.name, remain.prompts) == ("remain", ["bird", "bird", "cat", "cat"])
    assert len(resolve_prompt_sets(["class:dog"])[0].prompts) == 100
    for bad in ("class:", "class:dog:many", "class:dog:0"):
        with pytest.raises(UserError, match="class:"):
            resolve_prompt_sets([bad])


def test_unlearn_a_users_class_model_end_to_end(class_world, tmp_path, capsys):
    out = tmp_path / "run"
    main(["unlearn", f"model={class_world / 'model'}", f"images={class_world / 'data.npz'}", "concept=bee",
          "method=rg", "steps=3", "batch_size=4", "lr=1e-3", "remain_per_class=5", "eval_steps=2",
          "--out", str(out), "--quiet"])
    results = json.loads((out / "results.json").read_text())
    assert results["target_class"] == 1 and results["training"]["steps"] == 3
    assert "ua" not in results  # no oracle for a user's model: `diffunlearn eval --metrics classifier`
    selection = json.loads((out / "data" / "selection.json").read_text())
    assert selection["forget_count"] == 12 and selection["remain_count"] == 15
    assert selection["remain_per_class"] == {"ant": 5, "cat": 5, "dog": 5}
    assert (out / "samples.png").stat().st_size > 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    trained, _ = load_adapter(str(out / "model"))
    base, _ = load_adapter(str(class_world / "model"))
    assert trained.class_names == CLASSES
    changed = sum(not torch.equal(a, b) for a, b in zip(trained.unet.parameters(), base.unet.parameters()))
    assert changed > 0
    assert "UNet2DModel.from_pretrained" in (out / "model" / "README.md").read_text()


def test_two_class_control_and_bad_class_names(class_world, tmp_path):
    out = tmp_path / "control"
    main(["unlearn", f"model={class_world / 'model'}", f"images={class_world / 'data.npz'}", "concept=ant",
          "remain_classes=cat,dog", "remain_per_class=4", "steps=1", "batch_size=4", "eval_steps=2",
          "--out", str(out), "--quiet"])
    selection = json.loads((out / "data" / "selection.json").read_text())
    assert selection["mode"] == "control" and selection["remain_count"] == 12   # 4 x 3 other classes
    assert {k: v for k, v in selection["remain_per_class"].items() if v} == {"cat": 6, "dog": 6}
    code = main(["unlearn", f"model={class_world / 'model'}", f"images={class_world / 'data.npz'}", "concept=zebra",
                 "steps=1", "--out", str(tmp_path / "bad"), "--quiet"])
    assert code == 2 and not (tmp_path / "bad").exists()
    code = main(["unlearn", f"model={class_world / 'model'}", "concept=ant", "steps=1", "--out", str(tmp_path / "x")])
    assert code == 2 and not (tmp_path / "x").exists()   # a user's model needs its images


def test_compare_and_study_rows_for_class_runs(tmp_path):
    from diffunlearn.jobs.compare import load_results
    from diffunlearn.jobs.study import point_options

    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"ua": 0.9, "ra": 0.8, "fd": 120.0}))
    flat = load_results(run)
    assert flat["classifier/forget/ua_complement"] == pytest.approx(0.1)
    assert flat["classifier/remain/ra"] == 0.8 and flat["oracle/remain/quality_fd"] == 120.0
    options = point_options(None, build_config(None, ["concept=red"]))
    assert (options.concept, options.target_class) == ("red", "red")


def test_cifar_config_reads_and_a_missing_model_is_one_clear_error(tmp_path, capsys):
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / "cifar10-class.yaml"
    cfg = build_config(config)
    assert (cfg.concept, cfg.method, cfg.steps, cfg.remain_weight, cfg.forget_cap) == (
        "airplane", "rgd", 782, 5.0, "elementwise")
    code = main(["unlearn", str(config), "--out", str(tmp_path / "run")])
    assert code == 2 and not (tmp_path / "run").exists()
    assert "model folder /models/ddpm-cifar10-cond does not exist" in capsys.readouterr().err


def test_eval_of_a_class_run_with_the_zero_shot_classifier(class_world, tmp_path):
    from diffunlearn.evaluate.clip import build_tiny_clip

    clip = build_tiny_clip(tmp_path / "clip", seed=0)
    run = tmp_path / "run"
    assert main(["unlearn", f"model={class_world / 'model'}", f"images={class_world / 'data.npz'}", "concept=bee",
                 "steps=1", "batch_size=4", "remain_per_class=3", "eval_steps=2", "--out", str(run), "--quiet"]) == 0
    assert main(["eval", str(run), "--metrics", "classifier", "--prompts", "class:bee:3", "class:ant,cat:2",
                 "--clip-model", str(clip), "--classes", ",".join(CLASSES), "--target-class", "bee",
                 "--quiet"]) == 0   # the run's own sampler: eval_steps=2
    results = json.loads((run / "eval" / "results.json").read_text())["metrics"]["classifier"]
    assert 0.0 <= results["forget"]["ua"] <= 1.0 and 0.0 <= results["remain"]["ra"] <= 1.0
    assert results["remain"]["scored"] == 4
    manifest = json.loads((run / "eval" / "manifest.json").read_text())
    assert manifest["sampler"]["name"] == "DDIMScheduler" and manifest["sampler"]["steps"] == 2
    assert len((run / "eval" / "per_sample.jsonl").read_text().splitlines()) == 7


def test_train_class_base_writes_a_loadable_model(tmp_path):
    from diffunlearn.worlds.class_digits import CLASS_NAMES, train_class_base

    final = train_class_base(tmp_path / "base", steps=2, batch_size=8, eval_every=2, eval_per_class=1, progress=False)
    assert final["step"] == 2 and 0.0 <= final["accuracy"] <= 1.0 and len(final["per_class"]) == 10
    model, _ = load_adapter(str(tmp_path / "base"))
    assert model.class_names == CLASS_NAMES and model.null_class == 10
    record = json.loads((tmp_path / "base" / "training.json").read_text())
    assert record["args"]["steps"] == 2 and record["evaluations"][-1]["accuracy"] == final["accuracy"]


def test_reduced_table1_on_the_embedded_class_model(tmp_path, monkeypatch):
    import diffunlearn.jobs.class_demo as class_demo

    out = tmp_path / "demo"
    small = ["steps=2", "eval_prompts=18", "remain_per_class=5", "eval_steps=6", "batch_size=8"]
    summary = class_demo.run_class_demo(out, ("three",), ("rg", "graddiff"), True, small, progress=False)
    per = summary["per_class"]["three"]
    assert set(per) == {"base", "rg", "graddiff", "rg-two-class"}
    assert per["base"]["ua"] <= 0.2 and per["base"]["ra"] >= 0.8        # the base model draws its classes
    for name in ("rg", "graddiff", "rg-two-class"):
        assert 0.0 <= per[name]["ua"] <= 1.0 and 0.0 <= per[name]["ra"] <= 1.0 and per[name]["fd"] > 0
    control = json.loads((out / "three" / "rg-two-class" / "data" / "selection.json").read_text())
    assert {k: v for k, v in control["remain_per_class"].items() if v} == {"four": 23, "five": 22}
    balanced = json.loads((out / "three" / "rg" / "data" / "selection.json").read_text())
    assert balanced["remain_count"] == 45 and balanced["forget_count"] == 250
    report = (out / "report.md").read_text()
    assert "## Table 1" in report and "## Table 3" in report and (out / "grid.png").stat().st_size > 0
    assert summary["table"]["rg"]["ua"] == pytest.approx(per["rg"]["ua"])

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    import diffunlearn.jobs.run as job

    monkeypatch.setattr(job, "run_job", refuse)   # resumable: every run is reused
    again = class_demo.run_class_demo(out, ("three",), ("rg", "graddiff"), True, small, progress=False)
    assert again["per_class"]["three"]["rg"]["ua"] == per["rg"]["ua"]


def test_the_oracle_is_a_registry_classifier_that_reads_real_renders():
    """The in-run UA/RA of the embedded class model come from the registry's classifier metric
    (classifier=embedded:oracle): on real renders it reads every class right."""
    from diffunlearn.evaluate.base import MetricOptions, build_metric
    from diffunlearn.worlds.class_digits import CLASS_NAMES, render_classes

    labels = torch.arange(10).repeat(3)
    images = render_classes(labels, torch.Generator().manual_seed(0), split="test")
    prompts = [CLASS_NAMES[i] for i in labels.tolist()]
    metric = build_metric("classifier", MetricOptions(classifier="embedded:oracle", classes=CLASS_NAMES,
                                                      target_class="three"))
    remain = metric.score(images, prompts, "remain")
    assert remain.aggregate["ra"] >= 0.95 and remain.aggregate["unscored"] == 0.0
    threes = images[labels == 3]
    forget = metric.score(threes, ["three"] * len(threes), "forget")
    assert forget.aggregate["ua"] <= 0.05   # the renders of "three" ARE threes: nothing forgotten
    assert remain.settings["classifier"] == "digit-world oracle (digit reading)"
