"""End to end on a tiny Stable Diffusion pipeline through the CLI: data build, every method and
parameter selection, LoRA output loaded by diffusers, resume, the NaN stop, 2-process equivalence
under `accelerate launch` (the bench: tests/test_precision.py, through scripts/gpu-check.sh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffunlearn import cli

COMMON = ["num_pairs=8", "batch_size=4", "steps=2", "data_steps=2", "eval_steps=2", "eval_prompts=2", "lr=1e-3",
          "margin=2.0"]


def run(*args: str) -> int:
    return cli.main([*args, "--quiet"] if args[0] != "bench" else [*args])


@pytest.fixture(scope="module")
def data_dir(tiny_sd_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sd-data") / "nudity"
    assert run("data", "build", f"model={tiny_sd_folder}", "num_pairs=8", "batch_size=4", "data_steps=2",
               "--out", str(out)) == 0
    return out


def unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def read_pngs(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted((folder / "images").glob("*.png"))]).astype(int)


def test_data_build_writes_a_manifest_and_resumes(data_dir, tiny_sd_folder):
    manifest = json.loads((data_dir / "forget" / "manifest.json").read_text())
    assert len(manifest["prompts"]) == 8 and len(manifest["image_sha256"]) == 8
    assert manifest["sampler"] == "DPMSolverMultistepScheduler" and manifest["steps"] == 2
    assert manifest["guidance"] == 7.5 and manifest["seeds"] == list(range(8))
    assert all("nude" in p or "naked" in p or "bare" in p or "unclad" in p or "undressed" in p
               for p in manifest["prompts"])
    remain = json.loads((data_dir / "remain" / "manifest.json").read_text())
    assert remain["seeds"] == list(range(50000, 50008))
    prompts = json.loads((data_dir / "prompts.json").read_text())
    assert len(prompts["train"]["forget"]) == 8 and len(prompts["test"]["forget"]) == 100
    # Pairs differ only by the concept word; test prompts use the disjoint vocabulary.
    for f, r in zip(prompts["train"]["forget"], prompts["train"]["remain"]):
        assert len(f.split()) == len(r.split()) + 1
    assert not set(prompts["test"]["forget"]) & set(prompts["train"]["forget"])
    # Resume: a lost image is made again, identical; the others are not touched.
    before = read_pngs(data_dir / "forget")
    victim = data_dir / "forget" / "images" / "00005.png"
    stamp = (data_dir / "forget" / "images" / "00001.png").stat().st_mtime_ns
    victim.unlink()
    (data_dir / "forget" / "manifest.json").unlink()
    assert run("data", "build", f"model={tiny_sd_folder}", "num_pairs=8", "batch_size=4", "data_steps=2",
               "--out", str(data_dir)) == 0
    assert np.abs(read_pngs(data_dir / "forget") - before).max() <= 1
    assert (data_dir / "forget" / "images" / "00001.png").stat().st_mtime_ns == stamp
    assert json.loads((data_dir / "forget" / "manifest.json").read_text())["image_sha256"][0] == \
        manifest["image_sha256"][0]
    # Another request into the same folder is refused, not mixed in.
    assert run("data", "build", f"model={tiny_sd_folder}", "num_pairs=8", "data_steps=3", "--out",
               str(data_dir)) == 2


# Every method on the full UNet and as a LoRA (the two code paths that differ most), every selection
# with rg and GradDiff: the selection only decides which weights train, the same code for every method.
# (The full 4 x 4 grid passed when this test was trimmed to keep `make test` in its budget.)
RUNS = ([(m, s) for m in ("ga", "graddiff", "rg", "rgd") for s in ("full", "lora")]
        + [("rg", "cross-attention"), ("graddiff", "non-cross-attention")])


@pytest.mark.parametrize("method, selection", RUNS)
def test_every_method_and_selection_runs_end_to_end(tiny_sd_folder, data_dir, tmp_path, method, selection):
    out = tmp_path / "run"
    assert run("unlearn", f"model={tiny_sd_folder}", f"method={method}", f"selection={selection}", "lora_rank=2",
               f"data_dir={data_dir}", *COMMON, "--out", str(out)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["training"]["steps"] == 2 and np.isfinite(results["training"]["final_forget_loss"])
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    card = (out / "model" / "README.md").read_text()
    assert f"'nudity' unlearned ({method})" in card and f"`{selection}`" in card
    assert (out / "samples_forget.png").is_file() and (out / "samples_remain.png").is_file()
    if selection == "lora":
        assert results["model"]["format"] == "lora"
        lora = load_file(str(out / "model" / "pytorch_lora_weights.safetensors"))
        assert lora and all("lora" in k for k in lora)
        return
    base, after = unet_weights(tiny_sd_folder), unet_weights(out / "model")
    trained = {"full": lambda k: True, "cross-attention": lambda k: ".attn2." in k,
               "non-cross-attention": lambda k: ".attn2." not in k}[selection]
    frozen_same = all(torch.equal(base[k], after[k]) for k in base if not trained(k))
    changed = [k for k in base if trained(k) and not torch.equal(base[k], after[k])]
    assert frozen_same
    assert len(changed) >= 0.5 * sum(trained(k) for k in base)


@pytest.mark.parametrize("method", ["esd-u", "esd-x", "salun", "ft"])
def test_baselines_run_on_stable_diffusion(tiny_sd_folder, data_dir, tmp_path, method):
    out = tmp_path / "run"
    assert run("unlearn", f"model={tiny_sd_folder}", f"method={method}", f"data_dir={data_dir}", *COMMON,
               "anchor=a person wearing clothes", "--out", str(out)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["training"]["steps"] == 2 and np.isfinite(results["training"]["final_forget_loss"])
    base, after = unet_weights(tiny_sd_folder), unet_weights(out / "model")
    trained = {"esd-u": lambda k: ".attn2." not in k, "esd-x": lambda k: ".attn2." in k}.get(method, lambda k: True)
    assert all(torch.equal(base[k], after[k]) for k in base if not trained(k))
    assert any(not torch.equal(base[k], after[k]) for k in base if trained(k))


def test_lora_result_loads_in_diffusers_and_reproduces_the_trained_model(tiny_sd_folder, data_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from diffunlearn.models.sd import StableDiffusionAdapter

    out = tmp_path / "lora"
    assert run("unlearn", f"model={tiny_sd_folder}", "selection=lora", "lora_rank=4", "lora_alpha=8",
               f"data_dir={data_dir}", *COMMON, "lr=5e-2", "--out", str(out)) == 0
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_folder, safety_checker=None)
    pipe.load_lora_weights(out / "model")
    reloaded = StableDiffusionAdapter.from_pipeline(pipe)
    request = json.loads((out / "samples" / "unlearned" / "request.json").read_text())
    images = reloaded.sample(request["prompts"], request["seeds"], steps=request["steps"],
                             guidance=request["guidance"])
    as_uint8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy().astype(int)
    trained = read_pngs(out / "samples" / "unlearned")
    base = read_pngs(out / "samples" / "base")
    assert np.abs(as_uint8 - trained).max() <= 1  # the model at the end of training, through diffusers' loader
    assert np.abs(trained - base).max() > 10  # and the LoRA really changed it


def test_resume_after_an_interruption_matches_an_uninterrupted_run(tiny_sd_folder, data_dir, tmp_path, monkeypatch,
                                                                    crash_after_checkpoint):
    args = [f"model={tiny_sd_folder}", f"data_dir={data_dir}", *COMMON, "steps=4", "checkpoint_every=1"]
    assert run("unlearn", *args, "--out", str(tmp_path / "straight")) == 0

    import diffunlearn.core.training as training

    real_save = crash_after_checkpoint(training, "save_checkpoint", at_step=2)
    assert run("unlearn", *args, "--out", str(tmp_path / "resumed")) == 130
    assert not (tmp_path / "resumed" / "results.json").exists()
    monkeypatch.setattr(training, "save_checkpoint", real_save)
    assert run("unlearn", "--resume", str(tmp_path / "resumed")) == 0
    a, b = unet_weights(tmp_path / "straight" / "model"), unet_weights(tmp_path / "resumed" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert run("unlearn", "--resume", str(tmp_path / "resumed")) == 2  # finished: nothing to resume


def test_nan_stops_with_a_clear_error_and_writes_no_result(tiny_sd_folder, data_dir, tmp_path, capsys):
    out = tmp_path / "nan"
    code = run("unlearn", f"model={tiny_sd_folder}", f"data_dir={data_dir}", *COMMON, "steps=4", "lr=1e30",
               "forget_cap=none", "method=graddiff", "checkpoint_every=1", "--out", str(out))
    err = capsys.readouterr().err
    assert code == 2 and "NaN/inf" in err and "step-000001" in err and "Traceback" not in err
    assert not (out / "results.json").exists() and not (out / "model").exists()
    assert (out / "checkpoints" / "step-000001" / "trainable.safetensors").is_file()


@pytest.mark.parametrize("args, fragment", [
    (["concept=three"], "unknown concept 'three' for a Stable Diffusion model"),
    (["save=lora"], "`save: lora` needs `selection: lora`"),
    (["mixed_precision=fp8"], "`mixed_precision` must be one of"),
    (["optimizer=adam8bit"], "bitsandbytes"),
])
def test_bad_sd_settings_exit_2(tiny_sd_folder, data_dir, tmp_path, capsys, args, fragment):
    pytest.importorskip("peft")
    if "adam8bit" in args[0]:
        try:
            import bitsandbytes  # noqa: F401
            pytest.skip("bitsandbytes is installed")
        except ImportError:
            pass
    code = run("unlearn", f"model={tiny_sd_folder}", f"data_dir={data_dir}", *COMMON, *args,
               "--out", str(tmp_path / "bad"))
    assert code == 2 and fragment in capsys.readouterr().err
    assert not (tmp_path / "bad" / "results.json").exists()


# The SD 1.x 2-process run (30 s here) with DIFFUNLEARN_FULL_TESTS=1: `make test` runs the SD3 one
# (tests/test_families_parallel.py), the same engine code with the harder σ stream of flow matching.
@pytest.mark.skipif(os.environ.get("DIFFUNLEARN_FULL_TESTS") != "1", reason="DIFFUNLEARN_FULL_TESTS=1 runs it")
def test_two_processes_reach_the_same_weights_as_one(tiny_sd_folder, data_dir, tmp_path):
    # One process splits the global batch of 4 into the same two halves the two processes hold
    # (micro_batches=2), all single-threaded, so both compute the same per-half float sums. (The one
    # process is this test's own, one thread: tests/conftest.py.) The sharded `data build` is checked
    # for SD3 in tests/test_families_parallel.py; its code is the same for every family.
    args = [f"model={tiny_sd_folder}", f"data_dir={data_dir}", *COMMON, "steps=3", "method=rg", "lr=1e-4"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "diffunlearn.cli"]
    assert run("unlearn", *args, "micro_batches=2", "--out", str(tmp_path / "one")) == 0
    proc = subprocess.run([*launch, "unlearn", *args, "--out", str(tmp_path / "two"), "--quiet"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = unet_weights(tmp_path / "one" / "model"), unet_weights(tmp_path / "two" / "model")
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    moved = max((one[k] - unet_weights(tiny_sd_folder)[k]).abs().max().item() for k in one)
    assert diff <= 1e-6 and moved > 1e-4
    a = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["forget_loss"] for r in a] == pytest.approx([r["forget_loss"] for r in b], rel=1e-5)
    assert [r["cos"] for r in a] == pytest.approx([r["cos"] for r in b], abs=1e-5)
