"""Issue 15 §5: the 2-process gloo run equals one process for SDXL, SD3 and FLUX, as it does for SD
(tests/test_sd_cli.py), and `diffunlearn data build` shards across the processes into the same set
(checked for SD3 here and SD in tests/test_sd_cli.py: the sharding code is the same for every family).

One process splits the global batch of 4 into the two halves the two processes hold (micro_batches=2);
both run single-threaded, so both compute the same per-half float sums. The flow families draw σ from
the run's generator, so this also checks that both processes draw the same σ stream."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

FAMILIES = {"sdxl": ("tiny_sdxl_folder", "unet"), "sd3": ("tiny_sd3_folder", "transformer"),
            "flux": ("tiny_flux_folder", "transformer")}
COMMON = ["num_pairs=8", "batch_size=4", "data_steps=2", "eval_steps=2", "eval_prompts=2", "margin=4.0",
          "steps=2", "method=rg", "lr=1e-3"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
SINGLE = [sys.executable, "-m", "diffunlearn.cli"]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "diffunlearn.cli"]


def cli(command: list[str], *args: str) -> None:
    """``SINGLE`` runs in this test's own process (one thread: tests/conftest.py), which saves a
    process start; ``LAUNCH`` starts the two gloo processes."""
    if command is SINGLE:
        from diffunlearn.cli import main

        assert main([*args, "--quiet"]) == 0
        return
    proc = subprocess.run([*command, *args, "--quiet"], env=ENV, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]


def weights(folder: Path, part: str) -> dict:
    return load_file(str(folder / part / "diffusion_pytorch_model.safetensors"))


def pngs(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted((folder / "images").glob("*.png"))]).astype(int)


# SD3 in `make test` (flow matching: the σ stream of both processes); SDXL and FLUX with
# DIFFUNLEARN_FULL_TESTS=1 (30 s each here, which `make test`'s 8-minute budget cannot hold; all three
# passed when this test was written).
FULL = os.environ.get("DIFFUNLEARN_FULL_TESTS") == "1"


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.skipif(n != "sd3" and not FULL,
                                                                          reason="DIFFUNLEARN_FULL_TESTS=1 runs it"))
                                  for n in sorted(FAMILIES)])
def test_two_processes_build_the_same_data_and_reach_the_same_weights(name, request, tmp_path):
    fixture, part = FAMILIES[name]
    folder = request.getfixturevalue(fixture)
    build = ["data", "build", f"model={folder}", "num_pairs=8", "batch_size=4", "data_steps=2"]
    cli(SINGLE, *build, "threads=1", "--out", str(tmp_path / "data1"))
    if name == "sd3":  # the sharded build is family-independent code; once for a latent family keeps the budget
        cli(LAUNCH, *build, "--out", str(tmp_path / "data2"))
        for side in ("forget", "remain"):
            assert pngs(tmp_path / "data1" / side).shape[0] == 8
            assert np.abs(pngs(tmp_path / "data1" / side) - pngs(tmp_path / "data2" / side)).max() <= 1
            assert (json.loads((tmp_path / "data1" / side / "request.json").read_text())
                    == json.loads((tmp_path / "data2" / side / "request.json").read_text()))

    args = [f"model={folder}", f"data_dir={tmp_path / 'data1'}", *COMMON]
    cli(SINGLE, "unlearn", *args, "micro_batches=2", "threads=1", "--out", str(tmp_path / "one"))
    cli(LAUNCH, "unlearn", *args, "--out", str(tmp_path / "two"))
    one, two = weights(tmp_path / "one" / "model", part), weights(tmp_path / "two" / "model", part)
    base = weights(Path(folder), part)
    assert max((one[k] - two[k]).abs().max().item() for k in one) <= 1e-6
    assert max((one[k] - base[k]).abs().max().item() for k in one) > 1e-5      # the weights did move
    a = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 2
    assert [r["forget_loss"] for r in a] == pytest.approx([r["forget_loss"] for r in b], rel=1e-5)
    assert [r["cos"] for r in a] == pytest.approx([r["cos"] for r in b], abs=1e-5)
