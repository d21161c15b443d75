"""Issue 16 §3: UCE, the closed-form baseline. On the tiny Stable Diffusion pipeline the edited
cross-attention projections satisfy the normal equations of the least-squares problem, the preserved
texts keep their keys and values, the erased words map to the guide's; through the CLI it edits the
digit world without generating a training image, and a model family it cannot edit is refused."""

from __future__ import annotations

import json

import pytest
import torch

from diffunlearn import cli
from diffunlearn.config import build_config
from diffunlearn.methods import get_method
from diffunlearn.methods.uce import aligned_states, erase_texts, preserved_states, projections
from diffunlearn.models import load_adapter

PRESERVE = "a photo of a cat,a red car on a street,a painting of a lighthouse"


@pytest.fixture(scope="module")
def sd(tiny_sd_folder):
    return load_adapter(str(tiny_sd_folder), device="cpu")[0], str(tiny_sd_folder)


def edit(adapter, folder, *extra):
    cfg = build_config(None, [f"model={folder}", "method=uce", "concept=nudity", f"uce_preserve={PRESERVE}", *extra])
    model = adapter.clone()
    before = {n: m.weight.detach().clone().double() for n, m in projections(model.unet)}
    history = get_method("uce").apply(model, cfg, None, None, None, None)
    return cfg, model, before, history


def test_the_edit_solves_the_normal_equations_and_keeps_the_preserved_texts(sd):
    adapter, folder = sd
    cfg, model, before, history = edit(adapter, folder, "uce_preserve_scale=10000")
    assert history[0]["edited_projections"] == len(before) > 0 and history[0]["edit_seconds"] > 0
    erase = erase_texts(["nudity"])
    c_old, c_new = aligned_states(adapter, erase, [""] * len(erase))
    c_keep = preserved_states(adapter, PRESERVE.split(","))
    e, p, lam = cfg.uce_erase_scale, cfg.uce_preserve_scale, cfg.uce_lambda
    for name, module in projections(model.unet):
        W0, W = before[name], module.weight.detach().double()
        assert not torch.equal(W, W0)
        # λ(W − W0) + e·Σ (W c_i − W0 c*_i) c_iᵀ + p·Σ (W c_j − W0 c_j) c_jᵀ = 0: the gradient of the objective.
        residual = (lam * (W - W0) + e * (c_old @ W.T - c_new @ W0.T).T @ c_old
                    + p * (c_keep @ W.T - c_keep @ W0.T).T @ c_keep)
        scale = (lam * W0).norm() + e * ((c_new @ W0.T).T @ c_old).norm() + p * ((c_keep @ W0.T).T @ c_keep).norm()
        assert float(residual.norm() / scale) < 1e-6            # float32 storage of the float64 solution
        kept = (c_keep @ W.T - c_keep @ W0.T).norm() / (c_keep @ W0.T).norm()
        assert float(kept) < 1e-3                               # preserved keys/values unchanged


def test_without_preservation_the_preserved_texts_do_change(sd):
    adapter, folder = sd
    _, kept_model, before, _ = edit(adapter, folder, "uce_preserve_scale=10000")
    _, free_model, _, _ = edit(adapter, folder, "uce_preserve=")
    c_keep = preserved_states(adapter, PRESERVE.split(","))

    def change(model):
        return max(float((c_keep @ m.weight.detach().double().T - c_keep @ before[n].T).norm()
                         / (c_keep @ before[n].T).norm()) for n, m in projections(model.unet))

    assert change(free_model) > 30 * change(kept_model)
    # Unconstrained, the erased words' keys and values move most of the way to the guide's.
    erase = erase_texts(["nudity"])
    c_old, c_new = aligned_states(adapter, erase, [""] * len(erase))
    for n, m in projections(free_model.unet):
        W0, W = before[n], m.weight.detach().double()
        assert float((c_old @ W.T - c_new @ W0.T).norm() / (c_old @ W0.T - c_new @ W0.T).norm()) < 0.5


def test_uce_through_the_cli_edits_the_digit_world_without_training_images(tmp_path, capsys, tiny_sd3_folder):
    out = tmp_path / "uce"
    assert cli.main(["unlearn", "method=uce", "concept=three,red", "eval_prompts=8", "eval_steps=2", "threads=1",
                     "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["forget_scores"]) == ["red", "three"] and not (out / "data").exists()
    record = json.loads((out / "metrics.jsonl").read_text())
    assert "digit three" in record["erased_texts"] and "red" in record["erased_texts"]
    assert (out / "model" / "unet").is_dir()
    capsys.readouterr()
    assert cli.main(["unlearn", f"model={tiny_sd3_folder}", "method=uce", "--out", str(tmp_path / "sd3"),
                     "--quiet"]) == 2
    assert "gradient method" in capsys.readouterr().err and not (tmp_path / "sd3").exists()
    assert erase_texts(["van-gogh"])[0].startswith("in the style")
