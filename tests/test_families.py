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


@pytest.mark.parametrize("pipeline, kind, guidance", [("StableDiffusionXLPipeline", "sdxl", 5.0),
                                                      ("FluxPipeline", "flux", 3.5),
                                                      ("StableDiffusionPipeline", "text", 7.5)])
def test_a_hub_id_in_the_local_cache_gets_its_familys_recipe_and_load_code(pipeline, kind, guidance, tmp_path,
                                                                          monkeypatch):
    """A Hub id is told apart by the model_index.json in the Hugging Face cache (HF_HUB_OFFLINE=1: no
    network), so an SDXL or FLUX id is not given the SD recipe and model card."""
    import json

    import huggingface_hub.constants

    from diffunlearn.jobs.modelcard import write_model_card

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someorg--a-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert model_kind("someorg/a-model") == kind
    assert model_kind("someorg/not-cached") == "text"         # unreadable: the loader reports it
    cfg = build_config(None, ["model=someorg/a-model"])
    assert (cfg.data_guidance, cfg.eval_guidance) == (guidance, guidance)
    (tmp_path / "card").mkdir()
    write_model_card(tmp_path / "card", cfg, "lora", "someorg/a-model", "diffunlearn unlearn", {}, {}, None)
    card = (tmp_path / "card" / "README.md").read_text()
    assert f"{pipeline}.from_pretrained" in card
