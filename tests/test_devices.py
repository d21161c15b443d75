"""Every model family lands on the device a run asks for (issue 14: a user's class-conditional model
trained on the CPU even with ``device: cuda``, because only Stable Diffusion got the device). On
this CPU machine the check is that the requested device reaches each adapter's ``to`` on every path
that loads a model for a run; the GPU check script runs the class track on CUDA."""

from __future__ import annotations

import pytest
import torch

from diffunlearn.cli import main
from diffunlearn.config import build_config
from diffunlearn.jobs.runfolder import load_for_run
from diffunlearn.models import load_adapter
from diffunlearn.models.pixel_base import PixelSpaceAdapter


@pytest.fixture
def placements(monkeypatch):
    seen = []
    real = PixelSpaceAdapter.to

    def spy(self, device):
        seen.append((type(self).__name__, torch.device(device)))
        return real(self, device)

    monkeypatch.setattr(PixelSpaceAdapter, "to", spy)
    return seen


@pytest.mark.parametrize(("model", "adapter"), [("embedded:digits", "PixelTextToImage"),
                                                ("embedded:digits-class", "ClassConditionalAdapter")])
def test_load_for_run_places_every_family_on_the_requested_device(placements, model, adapter):
    loaded, _ = load_for_run(build_config(None, [f"model={model}", "device=cpu", "threads=1"]))
    assert placements == [(adapter, torch.device("cpu"))]
    assert loaded.device == torch.device("cpu") and all(p.device.type == "cpu" for p in loaded.unet.parameters())


def test_load_adapter_moves_the_pixel_models_only_when_asked(placements):
    load_adapter("embedded:digits-class")
    assert placements == []  # no device given: the family's default (CPU), no move
    adapter, _ = load_adapter("embedded:digits-class", device="cpu")
    assert placements == [("ClassConditionalAdapter", torch.device("cpu"))] and adapter.device.type == "cpu"


def test_a_class_track_run_takes_its_device_from_the_config(placements, tmp_path):
    # The class track used to load its model without the run's device (and so trained on the CPU
    # with device: cuda); it now goes through load_for_run like every other run.
    assert main(["unlearn", "model=embedded:digits-class", "concept=three", "steps=1", "remain_per_class=4",
                 "eval_prompts=4", "eval_steps=2", "device=cpu", "threads=1", "--out", str(tmp_path / "run"),
                 "--quiet"]) == 0
    assert ("ClassConditionalAdapter", torch.device("cpu")) in placements


def test_samples_come_back_on_the_cpu_whatever_the_device():
    adapter, _ = load_adapter("embedded:digits-class", device="cpu")
    images = adapter.sample(["three"], [0], steps=2)
    assert images.device.type == "cpu" and images.shape[0] == 1 and float(images.abs().max()) <= 1.0
