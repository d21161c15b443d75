"""ESD, SalUn and fine-tuning: the formulas by hand, the mask fraction, what trains and what stays."""

from __future__ import annotations

import pytest
import torch

from diffunlearn.config import build_config
from diffunlearn.core.losses import draw_noise, esd_target
from diffunlearn.core.training import GradientEngine, unlearn
from diffunlearn.methods import get_method
from diffunlearn.methods.salun import saliency_masks
from test_methods import fresh_adapter, snapshot, tiny_data


def test_esd_target_formula():
    u, c = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, -1.0, 0.5])
    assert torch.equal(esd_target(u, c, 2.0), torch.tensor([1.0 - 4.0, -2.0 - 2.0, 0.5]))


@pytest.mark.parametrize("eta", [1.0, 3.0])
def test_esd_first_step_loss_matches_a_hand_computation(text_encoder, eta):
    # At step 1 the trained model equals its frozen copy, so ‖ε(c) − (ε(∅) − η(ε(c) − ε(∅)))‖² = (1+η)²‖ε(c) − ε(∅)‖².
    adapter = fresh_adapter(text_encoder)
    fx, fc, rx, rc = tiny_data(adapter, n=8)
    cfg = build_config(None, ["method=esd-x", "steps=1", "batch_size=4", "lr=1e-4", f"esd_eta={eta}"])
    history = unlearn(fresh_adapter(text_encoder), get_method("esd-x"), cfg, fx, fc, rx, rc, progress=False)
    gen = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randperm(8, generator=gen)[:4]
    noise, t = draw_noise(fx[idx], adapter, gen)
    with torch.no_grad():
        x_t = adapter.add_noise(fx[idx], noise, t)
        e_c = adapter.predict_noise(x_t, t, fc[idx])
        e_u = adapter.predict_noise(x_t, t, adapter.encode_prompts([""] * 4))
    hand = ((1 + eta) ** 2 * ((e_c - e_u) ** 2).flatten(1).mean(1)).mean().item()
    assert history[0]["forget_loss"] == pytest.approx(hand, rel=1e-5)


def test_esd_variants_pick_their_parameter_selection():
    assert build_config(None, ["method=esd-u"]).selection == "non-cross-attention"
    assert build_config(None, ["method=esd-x"]).selection == "cross-attention"
    assert build_config(None, ["method=esd-x", "selection=full"]).selection == "full"
    assert build_config(None, ["method=esd-x", "model=/some/sd", "concept=nudity"]).selection == "cross-attention"


@pytest.mark.parametrize("fraction", [0.5, 0.2])
def test_salun_mask_selects_the_stated_fraction(text_encoder, fraction):
    adapter = fresh_adapter(text_encoder)
    fx, fc, _, _ = tiny_data(adapter, n=8)
    params = [p for _, p in adapter.trainable_parameters("full")]
    cfg = build_config(None, ["method=salun", "batch_size=4", f"saliency_fraction={fraction}"])
    masks = saliency_masks(GradientEngine(adapter, params, torch.Generator().manual_seed(0)), fx, fc, cfg)
    kept = sum(int(m.sum()) for m in masks)
    total = sum(m.numel() for m in masks)
    assert abs(kept / total - fraction) < 1e-3
    assert all(m.shape == p.shape and m.dtype == torch.bool for m, p in zip(masks, params))


def test_salun_trains_only_salient_entries(text_encoder):
    adapter = fresh_adapter(text_encoder)
    data = tiny_data(adapter, n=8)
    params = [p for _, p in adapter.trainable_parameters("full")]
    cfg = build_config(None, ["method=salun", "steps=2", "batch_size=4", "lr=1e-3", "saliency_fraction=0.3"])
    masks = saliency_masks(GradientEngine(adapter, params, torch.Generator().manual_seed(cfg.seed + 7919)),
                           data[0], data[1], cfg)
    before = [p.detach().clone() for p in params]
    history = unlearn(adapter, get_method("salun"), cfg, *data, progress=False)
    after = [p.detach() for p in params]
    outside_same = all(torch.equal(b[~m], a[~m]) for b, a, m in zip(before, after, masks))
    inside_changed = sum(int((b[m] != a[m]).sum()) for b, a, m in zip(before, after, masks))
    assert outside_same and inside_changed >= 0.5 * sum(int(m.sum()) for m in masks)
    assert all(torch.isfinite(torch.tensor(h["forget_loss"])) for h in history)
    assert history[0]["forget_loss"] > 0  # the remap loss: trained vs frozen prediction for the paired prompt


def test_fine_tuning_uses_no_forget_gradient(text_encoder, tmp_path):
    adapter = fresh_adapter(text_encoder)
    data = tiny_data(adapter, n=8)
    before = snapshot(adapter.unet)
    cfg = build_config(None, ["method=ft", "steps=2", "batch_size=4", "lr=1e-3"])
    history = unlearn(adapter, get_method("ft"), cfg, *data, progress=False)
    assert all("cos" not in h and not h["forget_active"] for h in history)
    assert any(not torch.equal(before[k], v) for k, v in snapshot(adapter.unet).items())
    # The same run with the forget set replaced by anything gives the same weights: it is never used.
    other = fresh_adapter(text_encoder)
    fx, fc, rx, rc = data
    unlearn(other, get_method("ft"), cfg, torch.zeros_like(fx), fc, rx, rc, progress=False)
    a, b = snapshot(adapter.unet), snapshot(other.unet)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["esd-u", "salun"])
def test_baselines_are_deterministic(text_encoder, name):
    cfg = build_config(None, [f"method={name}", "steps=2", "batch_size=4", "lr=1e-3"])
    runs = []
    for _ in range(2):
        adapter = fresh_adapter(text_encoder)
        history = unlearn(adapter, get_method(name), cfg, *tiny_data(adapter, n=8), progress=False)
        runs.append((snapshot(adapter.unet), [h["forget_loss"] for h in history]))
    assert runs[0][1] == runs[1][1]
    assert all(torch.equal(runs[0][0][k], runs[1][0][k]) for k in runs[0][0])
