"""Mixed precision, loss scaling, micro-batches and the GPU-check script (its CPU form)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from diffunlearn.config import build_config
from diffunlearn.core.training import GradientEngine, LossScale, unlearn
from diffunlearn.methods import get_method
from test_methods import fresh_adapter, tiny_data

ROOT = Path(__file__).resolve().parents[1]


def test_loss_scale_halves_on_overflow_and_grows_after_good_steps():
    scale = LossScale(True, scale=1024.0, growth_interval=3)
    scale.update(False)
    assert scale.scale == 512.0 and scale.good_steps == 0
    for _ in range(3):
        scale.update(True)
    assert scale.scale == 1024.0
    off = LossScale(False)
    off.update(False)
    assert off.scale == 1.0


def test_bf16_autocast_keeps_fp32_master_weights_and_tracks_fp32_losses(text_encoder):
    losses = {}
    for precision in ("no", "bf16"):
        cfg = build_config(None, ["method=rg", "steps=2", "batch_size=4", "lr=1e-3", f"mixed_precision={precision}"])
        adapter = fresh_adapter(text_encoder)
        history = unlearn(adapter, get_method("rg"), cfg, *tiny_data(adapter), progress=False)
        assert all(p.dtype == torch.float32 for p in adapter.unet.parameters())
        losses[precision] = [h["forget_loss"] for h in history]
    assert losses["bf16"] != losses["no"]  # autocast really ran in bf16
    assert losses["bf16"] == pytest.approx(losses["no"], rel=2e-2)


@pytest.mark.parametrize("cap", ["hinge", "elementwise"])
def test_micro_batches_give_the_batch_gradient(text_encoder, cap):
    adapter = fresh_adapter(text_encoder)
    fx, fc, rx, rc = tiny_data(adapter, n=8)
    params = [p for _, p in adapter.trainable_parameters("full")]
    cfg = build_config(None, [f"forget_cap={cap}", "margin=5.0"])
    rows = torch.arange(8)
    results = []
    for micro in (1, 3):
        engine = GradientEngine(adapter, params, torch.Generator().manual_seed(0), micro_batches=micro)
        chunks = engine.chunks(fx, fc, rows)
        assert len(chunks) == micro and sum(c[4] for c in chunks) == pytest.approx(1.0)
        g_f, f_loss = engine.forget_grads(chunks, cfg)
        g_r, r_loss = engine.remain_grads(engine.chunks(rx, rc, rows))
        results.append((g_f, f_loss, g_r, r_loss))
    (f1, l1, r1, m1), (f3, l3, r3, m3) = results
    assert l1 == pytest.approx(l3, rel=1e-6) and m1 == pytest.approx(m3, rel=1e-6)
    norm = max(g.abs().max().item() for g in f1)
    assert norm > 0
    assert max((a - b).abs().max().item() for a, b in zip(f1, f3)) <= 1e-5 * norm
    assert max((a - b).abs().max().item() for a, b in zip(r1, r3)) <= 1e-5 * max(g.abs().max().item() for g in r1)


def test_the_hinge_is_decided_on_the_whole_batch_under_micro_batches(text_encoder):
    adapter = fresh_adapter(text_encoder)
    fx, fc, _, _ = tiny_data(adapter, n=8)
    params = [p for _, p in adapter.trainable_parameters("full")]
    engine = GradientEngine(adapter, params, torch.Generator().manual_seed(0), micro_batches=2)
    chunks = engine.chunks(fx, fc, torch.arange(8))
    mean = engine.mean_loss(chunks)
    for margin, active in ((mean + 1e-3, True), (mean - 1e-3, False)):
        g, _ = engine.forget_grads(chunks, build_config(None, ["forget_cap=hinge", f"margin={margin}"]))
        assert any(x.abs().max().item() > 0 for x in g) == active


def test_gpu_check_script_runs_small_on_cpu(tmp_path):
    # One torch thread: the script's processes would otherwise spin two threads beside the other test
    # worker on a 2-core machine (the test took 118 s in the suite, 100 s alone, before this).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no CUDA GPU" in proc.stdout
    # each section prints the seconds elapsed when it is done, so one GPU run times every part
    marks = [int(re.search(rf"\[(\d+) s\] {part} done", proc.stdout).group(1))
             for part in ("SD bench", "class track", "SDXL bench")]
    total = int(re.search(r"gpu-check finished in (\d+) s", proc.stdout).group(1))
    assert marks == sorted(marks) and marks[-1] <= total
    data = json.loads((tmp_path / "bench.json").read_text())
    assert sorted(data) == ["rg"]             # (the GPU form adds ga, graddiff and rg-flat)
    assert all(r["step_seconds"] > 0 and r["peak_memory_mb"] > 0 for r in data.values())
    assert "| rg |" in (tmp_path / "bench.md").read_text()
    # The class-track step: on this machine it must report the CPU (on a GPU machine, cuda).
    assert "class track ran on: cpu" in proc.stdout
    assert json.loads((tmp_path / "class-run" / "environment.json").read_text())["device"] == "cpu"
    # The SDXL and FLUX LoRA RG benches (issue 15 §4), on the tiny presets here.
    for family in ("sdxl", "flux"):
        bench = json.loads((tmp_path / f"bench-{family}.json").read_text())
        assert sorted(bench) == ["rg"]                      # (the GPU form adds graddiff for the ratio)
        assert all(r["step_seconds"] > 0 and r["peak_memory_mb"] > 0 for r in bench.values())
        assert "| rg |" in (tmp_path / f"bench-{family}.md").read_text()


def test_a_model_on_a_gpu_turns_off_cudnn_attention_and_one_on_the_cpu_leaves_it(monkeypatch):
    """The FLUX.1-dev-size LoRA step failed inside cuDNN's attention on the H200 check and ran with it
    off; loading a model onto a GPU, or starting a training engine there, turns it off for the
    process (training, evaluation and attacks alike); on the CPU nothing changes."""
    from types import SimpleNamespace

    import torch

    import diffunlearn.models as models
    from diffunlearn.core.training import GradientEngine

    was = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        GradientEngine(SimpleNamespace(device=torch.device("cpu")), [], torch.Generator())
        adapter, _ = models.load_adapter("embedded:digits")
        assert adapter.device.type == "cpu" and torch.backends.cuda.cudnn_sdp_enabled() is True
        GradientEngine(SimpleNamespace(device=torch.device("cuda", 0)), [], torch.Generator())
        assert torch.backends.cuda.cudnn_sdp_enabled() is False
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp(True)
        on_gpu = SimpleNamespace(device=torch.device("cuda", 0))  # what a loader returns on a GPU machine
        monkeypatch.setattr(models, "_load_adapter", lambda *args: (on_gpu, None))
        assert models.load_adapter("any")[0] is on_gpu and torch.backends.cuda.cudnn_sdp_enabled() is False
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)
