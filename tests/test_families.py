"""Each adapter declares its family and capabilities (issue 14 §1) instead of callers probing its
attributes; the declarations agree with what the folders say and with the recipes' constants."""

from __future__ import annotations

import pytest

from diffunlearn.config import CLASS_DEFAULTS, SD_DEFAULTS, build_config, model_kind
from diffunlearn.data.training import sample_batch
from diffunlearn.jobs.runfolder import save_format
from diffunlearn.models import ClassConditionalAdapter, PixelTextToImage, StableDiffusionAdapter, load_adapter
from diffunlearn.worlds.base_model import GUIDANCE, SAMPLE_STEPS


@pytest.mark.parametrize("model", ["embedded:digits", "embedded:digits-class"])
def test_a_saved_pixel_model_reads_back_as_its_declared_family(model, tmp_path):
    adapter, _ = load_adapter(model)
    adapter.save(tmp_path / "saved")
    assert model_kind(str(tmp_path / "saved")) == model_kind(model) == adapter.family
    assert adapter.save_formats == (adapter.family,)
    assert save_format(build_config(None, [f"model={model}"]), adapter) == adapter.family
    assert sample_batch(adapter, build_config(None, [f"model={model}"])) == 256


def test_the_stable_diffusion_family(tiny_sd_folder):
    adapter, _ = load_adapter(str(tiny_sd_folder), device="cpu")
    assert adapter.family == model_kind(str(tiny_sd_folder)) == "text" and adapter.condition_kind == "text"
    cfg = build_config(None, [f"model={tiny_sd_folder}", "batch_size=3"])
    assert sample_batch(adapter, cfg) == 3  # the training batch, which the GPU is known to hold
    assert save_format(cfg, adapter) == "pipeline"
    assert save_format(build_config(None, [f"model={tiny_sd_folder}", "selection=lora"]), adapter) == "lora"


def test_sampler_defaults_are_the_recipes():
    assert PixelTextToImage.sampler_defaults == (SAMPLE_STEPS, GUIDANCE)
    assert ClassConditionalAdapter.sampler_defaults == (CLASS_DEFAULTS["eval_steps"], CLASS_DEFAULTS["eval_guidance"])
    assert StableDiffusionAdapter.sampler_defaults == (SD_DEFAULTS["eval_steps"], SD_DEFAULTS["eval_guidance"])
    assert (PixelTextToImage.condition_kind, ClassConditionalAdapter.condition_kind) == ("text", "class")
