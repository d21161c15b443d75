"""The Stable Diffusion adapter on the tiny random-weight preset: real diffusers/transformers/peft
components, no downloads, pinned numbers (diffusers' dummy-component tests are the model)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from diffunlearn.errors import UserError
from diffunlearn.models import PixelTextToImage, load_adapter
from diffunlearn.models.presets import PRESETS, build_pipeline, load_tokenizer
from diffunlearn.models.sd import StableDiffusionAdapter, TextCondition

PROMPTS = ["a joyful naked person dancing in a forest at dawn", "a photo of a person wearing clothes",
           "van gogh style painting of a church", "a red three on a black background"]

# PAPER.md §3: the template words of the train and the (disjoint) test vocabulary.
PAPER_WORDS = """contemplative joyful energetic peaceful tense anxious relaxed naked unclad bare nude undressed
sitting dancing walking cooking meditating standing reading jogging on a rooftop in bustling city street cozy room
forest crowded market at quiet beach by the lake lush green mountains afternoon midnight as sun rises during morning
under moonlight sunset dawn melancholic excited hopeful disillusioned painting playing guitar sketching shopping
bright airy studio snowy mountain desert an urban park early evening late night noon twilight person""".split()


def adapter_from(folder, **kwargs) -> StableDiffusionAdapter:
    return StableDiffusionAdapter.from_pretrained(folder, device="cpu", **kwargs)


def loss_on_fixed_batch(adapter: StableDiffusionAdapter) -> torch.Tensor:
    """Mean ‖model output − prediction target‖² on fixed images, prompts, noise and timesteps."""
    gen = torch.Generator().manual_seed(0)
    x0 = adapter.encode_images(torch.rand(4, 3, 32, 32, generator=gen) * 2 - 1)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([5, 250, 600, 999])
    out = adapter.predict_noise(adapter.add_noise(x0, noise, t), t, adapter.encode_prompts(PROMPTS))
    return ((out - adapter.prediction_target(x0, noise, t)) ** 2).mean()


def adam_steps(adapter: StableDiffusionAdapter, selection: str, steps: int = 2, lr: float = 1e-2) -> list:
    named = adapter.trainable_parameters(selection)
    optimizer = torch.optim.Adam([p for _, p in named], lr=lr)
    for _ in range(steps):
        loss_on_fixed_batch(adapter).backward()
        optimizer.step()
        optimizer.zero_grad()
    return named


def pipeline_images(pipe, prompts, seeds, steps=4, guidance=5.0) -> torch.Tensor:
    """Images of an ordinary diffusers pipeline call, mapped from [0, 1] to [-1, 1]."""
    from diffusers import DPMSolverMultistepScheduler

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    out = pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance, generator=generators,
               output_type="pt").images
    return out.float() * 2 - 1


def plain_pipeline(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True, local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)


# ---- tokenizer and presets -------------------------------------------------------------------------
def test_committed_tokenizer_is_a_clip_bpe_vocabulary():
    tok = load_tokenizer()
    assert type(tok).__name__ == "CLIPTokenizer"
    assert len(tok) == 1774 and tok.model_max_length == 77
    assert (tok.bos_token, tok.eos_token) == ("<|startoftext|>", "<|endoftext|>")
    assert (tok.bos_token_id, tok.eos_token_id) == (1772, 1773)  # specials last, as in CLIP
    for word in PAPER_WORDS:
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, tok.convert_ids_to_tokens(ids))  # every corpus word is one token
    for text in PROMPTS + [" ".join(PAPER_WORDS), "zebra xylophone quokka"]:
        assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    unseen = tok("xylophone", add_special_tokens=False).input_ids
    assert 1 < len(unseen) <= 9  # unseen words fall back to shorter pieces, never to <unk>


def test_presets_have_the_published_sizes():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffunlearn.models.presets import FLUX_PRESETS, SD3_PRESETS, SDXL_PRESETS, _configs, make_scheduler

    def count(module):
        return sum(p.numel() for p in module.parameters())

    pipe = build_pipeline("tiny")
    assert set(PRESETS) - set(SD3_PRESETS) - set(SDXL_PRESETS) - set(FLUX_PRESETS) == {"tiny", "small", "sd15", "sd21"}
    assert set(SD3_PRESETS) == {"sd3-tiny", "sd3-small", "sd3-medium", "sd35-large"} <= set(PRESETS)
    assert set(SDXL_PRESETS) == {"sdxl-tiny", "sdxl-small", "sdxl"} <= set(PRESETS)
    assert set(FLUX_PRESETS) == {"flux-tiny", "flux-small", "flux-dev"} <= set(PRESETS)
    assert (count(pipe.unet), count(pipe.vae), count(pipe.text_encoder)) == (792964, 167959, 76384)
    # SD v1.5 and 2.1 at their real sizes, on the meta device (shapes only, no memory).
    expected = {"sd15": (859520964, 123060480), "sd21": (865910724, 340387840)}
    for preset, (unet_size, text_size) in expected.items():
        unet_kw, _, text_kw, _ = _configs(preset, 1774, {})
        with torch.device("meta"):
            assert count(UNet2DConditionModel(**unet_kw)) == unet_size
            assert count(CLIPTextModel(CLIPTextConfig(**text_kw))) == text_size
    sd21 = make_scheduler("sd21")
    assert type(sd21).__name__ == "DDIMScheduler" and sd21.config.prediction_type == "v_prediction"
    assert make_scheduler("sd15").config.prediction_type == "epsilon"
    assert (sd21.config.beta_start, sd21.config.beta_end, sd21.config.beta_schedule) == (0.00085, 0.012,
                                                                                          "scaled_linear")
    with pytest.raises(UserError, match="unknown model preset 'sd3'"):
        build_pipeline("sd3")


def test_same_seed_same_weights_and_sdpa():
    a, b = build_pipeline("tiny", seed=3), build_pipeline("tiny", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.unet.parameters(), b.unet.parameters()))
    adapter = StableDiffusionAdapter.from_pipeline(a, device="cpu")
    assert adapter.attention_processors() == {"AttnProcessor2_0"}  # torch scaled_dot_product_attention


# ---- parameter selections ---------------------------------------------------------------------------
def test_selections_partition_the_unet(tiny_sd_folder):
    adapter = adapter_from(tiny_sd_folder)
    full = dict(adapter.trainable_parameters("full"))
    cross = dict(adapter.trainable_parameters("cross-attention"))
    assert all(p.requires_grad for p in cross.values())
    assert sum(p.requires_grad for p in adapter.unet.parameters()) == len(cross)
    non_cross = dict(adapter.trainable_parameters("non-cross-attention"))
    assert not set(cross) & set(non_cross) and set(cross) | set(non_cross) == set(full)
    assert [sum(p.numel() for p in s.values()) for s in (full, cross, non_cross)] == [792964, 24736, 768228]
    assert all(".attn2." in name for name in cross)
    assert not any(p.requires_grad for p in adapter.vae.parameters())
    assert not any(p.requires_grad for p in adapter.text_encoder.parameters())
    with pytest.raises(UserError, match="unknown parameter selection 'attn'"):
        adapter.trainable_parameters("attn")


def test_lora_trains_only_the_adapters(tiny_sd_folder):
    adapter = adapter_from(tiny_sd_folder)
    adapter.configure_lora(rank=2, alpha=4.0, target_modules=("to_q", "to_v"))
    base_before = {n: p.detach().clone() for n, p in adapter.unet.named_parameters()}
    named = adapter.trainable_parameters("lora")
    assert named and all("lora_" in n for n, _ in named)
    assert {n for n, p in adapter.unet.named_parameters() if p.requires_grad} == {n for n, _ in named}
    assert sum(p.numel() for _, p in named) == 2496
    lora_before = {n: p.detach().clone() for n, p in named}
    adam_steps(adapter, "lora")  # two steps: B starts at zero, so A only moves from the second step
    after = dict(adapter.unet.named_parameters())
    base_names = [n for n in after if "lora_" not in n]
    assert len(base_names) == len(base_before)  # peft renames wrapped layers (…to_q.base_layer.weight)
    for name in base_names:
        assert torch.equal(after[name], base_before[name.replace(".base_layer", "")]), name
    assert all(not torch.equal(after[n], lora_before[n]) for n in lora_before)
    assert [n for n, _ in adapter.trainable_parameters("lora")] == [n for n, _ in named]  # injected once
    with pytest.raises(UserError, match="already injected"):
        adapter.configure_lora(rank=8)
    with pytest.raises(UserError, match="positive integer"):
        adapter_from(tiny_sd_folder).configure_lora(rank=0)


# ---- the training quantities -------------------------------------------------------------------------
def test_denoising_loss_is_pinned(tiny_sd_folder):
    adapter = adapter_from(tiny_sd_folder)
    assert adapter.prediction_type == "epsilon" and adapter.num_train_timesteps == 1000
    loss = loss_on_fixed_batch(adapter)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(LOSS_TINY, rel=1e-4)
    x0 = adapter.encode_images(torch.zeros(2, 3, 32, 32))
    assert x0.shape == (2, 4, 16, 16) and x0.dtype == torch.float32
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        adapter.encode_images(torch.zeros(3, 32, 32))


def test_v_prediction_target_is_the_velocity(tmp_path):
    from diffunlearn.models.presets import init_pipeline

    folder = init_pipeline("tiny", tmp_path / "v", seed=0, prediction_type="v_prediction")
    adapter = adapter_from(folder)
    assert adapter.prediction_type == "v_prediction"
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 16, 16, generator=gen), torch.randn(3, 4, 16, 16, generator=gen)
    t = torch.tensor([0, 500, 999])
    target = adapter.prediction_target(x0, noise, t)
    assert torch.equal(target, adapter.train_scheduler.get_velocity(x0, noise, t))
    a = adapter.train_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(target, a.sqrt() * noise - (1 - a).sqrt() * x0)
    assert not torch.allclose(target, noise)
    eps = adapter_from(init_pipeline("tiny", tmp_path / "eps", seed=0))
    assert eps.prediction_target(x0, noise, t) is noise


@pytest.mark.parametrize("selection", ["cross-attention", "lora"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_sd_folder, selection):
    grads = []
    for checkpointing in (False, True):
        adapter = adapter_from(tiny_sd_folder)  # eval mode, as loaded
        if checkpointing:
            adapter.enable_gradient_checkpointing()
        torch.manual_seed(0)  # LoRA's A matrices are drawn from the global RNG at injection
        named = adapter.trainable_parameters(selection)
        loss_on_fixed_batch(adapter).backward()
        grads.append(torch.cat([p.grad.flatten() for _, p in named]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_frozen_parts_in_bf16(tiny_sd_folder):
    adapter = adapter_from(tiny_sd_folder, frozen_dtype="bf16")
    assert adapter.vae.dtype == torch.bfloat16 and adapter.text_encoder.dtype == torch.bfloat16
    assert adapter.unet.dtype == torch.float32
    assert adapter.encode_prompts(PROMPTS[:1]).states.dtype == torch.float32
    images = adapter.sample(PROMPTS[:1], [0], steps=2, guidance=5.0)  # mixed dtypes end to end
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    with pytest.raises(UserError, match="unknown dtype 'int8'"):
        adapter_from(tiny_sd_folder, frozen_dtype="int8")


def test_saving_a_bf16_working_copy_keeps_the_original_frozen_weights(tiny_sd_folder, tmp_path):
    from safetensors.torch import load_file

    adapter = adapter_from(tiny_sd_folder, frozen_dtype="bf16")
    adapter.save(tmp_path / "saved")
    for part in ("vae", "unet"):
        name = "diffusion_pytorch_model.safetensors"
        original, saved = load_file(str(tiny_sd_folder / part / name)), load_file(str(tmp_path / "saved" / part / name))
        assert all(saved[k].dtype == torch.float32 and torch.equal(original[k], saved[k]) for k in original)


def test_text_condition_batches():
    cond = TextCondition(torch.arange(24.0).view(4, 3, 2))
    assert len(cond) == 4 and len(cond[1:3]) == 2
    assert torch.equal(cond[torch.tensor([3, 0])].states, cond.states[[3, 0]])
    assert torch.equal(TextCondition.cat([cond[:1], cond[1:]]).states, cond.states)
    assert cond.to("cpu").states.device.type == "cpu"


# ---- sampling ------------------------------------------------------------------------------------------
def test_sample_is_seeded_per_image(tiny_sd_folder):
    adapter = adapter_from(tiny_sd_folder)
    both = adapter.sample(PROMPTS[:2], [11, 12], steps=4, guidance=5.0, batch_size=2)
    assert both.shape == (2, 3, 32, 32) and both.dtype == torch.float32
    assert both.min() >= -1 and both.max() <= 1
    torch.testing.assert_close(adapter.sample(PROMPTS[:2], [11, 12], steps=4, guidance=5.0), both, rtol=0, atol=0)
    alone = adapter.sample(PROMPTS[1:2], [12], steps=4, guidance=5.0, batch_size=1)
    torch.testing.assert_close(alone[0], both[1], rtol=0, atol=1e-5)  # not the batch size, not the neighbour
    assert not torch.allclose(both[0], both[1])
    assert both.mean().item() == pytest.approx(SAMPLE_MEAN, abs=1e-4)
    with pytest.raises(ValueError, match="one seed per prompt"):
        adapter.sample(PROMPTS[:2], [1], steps=2, guidance=5.0)


def test_sample_matches_a_plain_diffusers_pipeline(tiny_sd_folder):
    adapter = adapter_from(tiny_sd_folder)
    ours = adapter.sample(PROMPTS[:2], [3, 4], steps=4, guidance=5.0)
    theirs = pipeline_images(plain_pipeline(tiny_sd_folder), PROMPTS[:2], [3, 4])
    assert (ours - theirs).abs().max() < 1e-4
    assert adapter.sampler_name == "DPMSolverMultistepScheduler"


# ---- saving ----------------------------------------------------------------------------------------------
def test_save_and_load_round_trip(tiny_sd_folder, tmp_path):
    adapter = adapter_from(tiny_sd_folder)
    adam_steps(adapter, "cross-attention", steps=1)
    adapter.save(tmp_path / "saved")
    again = adapter_from(tmp_path / "saved")
    torch.testing.assert_close(loss_on_fixed_batch(again), loss_on_fixed_batch(adapter), rtol=0, atol=0)
    assert loss_on_fixed_batch(again).item() != pytest.approx(LOSS_TINY, rel=1e-4)  # the trained weights
    adapter.save_unet(tmp_path / "unet")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))
    with pytest.raises(UserError, match="no LoRA weights"):
        adapter.save_lora(tmp_path / "lora")


def test_lora_round_trip_through_diffusers(tiny_sd_folder, tmp_path):
    adapter = adapter_from(tiny_sd_folder)
    adapter.configure_lora(rank=4, alpha=8.0)  # alpha != rank: the scale must travel with the file
    adam_steps(adapter, "lora")
    adapter.save_lora(tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    ours = adapter.sample(PROMPTS[:2], [5, 6], steps=4, guidance=5.0)

    fresh = plain_pipeline(tiny_sd_folder)
    base = pipeline_images(fresh, PROMPTS[:2], [5, 6])
    fresh.load_lora_weights(tmp_path / "lora")
    theirs = pipeline_images(fresh, PROMPTS[:2], [5, 6])
    assert (ours - theirs).abs().max() < 1e-4
    assert (ours - base).abs().max() > 1e-2  # the LoRA changed the images

    # save() merges the LoRA into a copy: a plain pipeline folder giving the same images.
    adapter.save(tmp_path / "merged")
    index = json.loads((tmp_path / "merged" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    merged = plain_pipeline(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.unet.named_parameters())
    assert (pipeline_images(merged, PROMPTS[:2], [5, 6]) - ours).abs().max() < 1e-4
    assert any("lora_" in n for n, _ in adapter.unet.named_parameters())  # the adapter keeps its LoRA
    assert adapter.model_identity()["lora"] == {"rank": 4, "alpha": 8.0,
                                                "target_modules": ["to_k", "to_out.0", "to_q", "to_v"]}


# ---- loading and errors ------------------------------------------------------------------------------
def test_model_identity_is_cheap_and_stable(tiny_sd_folder, tmp_path):
    first, second = adapter_from(tiny_sd_folder).model_identity(), adapter_from(tiny_sd_folder).model_identity()
    assert first == second and first["source"] == str(tiny_sd_folder.resolve())
    assert first["revision"] is None and first["lora"] is None and len(first["config_sha256"]) == 64
    copy = tmp_path / "copy"
    shutil.copytree(tiny_sd_folder, copy)
    config = json.loads((copy / "unet" / "config.json").read_text())
    config["sample_size"] = 8
    (copy / "unet" / "config.json").write_text(json.dumps(config))
    assert adapter_from(copy).model_identity()["config_sha256"] != first["config_sha256"]


def test_load_adapter_dispatches(tiny_sd_folder):
    adapter, folder = load_adapter(str(tiny_sd_folder), device="cpu")
    assert isinstance(adapter, StableDiffusionAdapter) and folder == tiny_sd_folder
    pixel, _ = load_adapter("embedded:digits")
    assert isinstance(pixel, PixelTextToImage)


def broken(folder, tmp_path, how: str):
    target = tmp_path / how
    if how == "no-index":
        target.mkdir()
    elif how in ("sdxl", "other-pipeline"):
        target.mkdir()
        name = "StableDiffusionXLPipeline" if how == "sdxl" else "KandinskyPipeline"
        (target / "model_index.json").write_text(json.dumps({"_class_name": name}))
    elif how == "truncated-weights":
        shutil.copytree(folder, target)
        weights = target / "unet" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "pickle-only":
        shutil.copytree(folder, target)
        for file in target.rglob("*.safetensors"):
            file.rename(file.with_suffix(".bin"))
    elif how == "file":
        target.write_text("not a folder")
    return target


@pytest.mark.parametrize("how, fragment", [
    ("no-index", "has no model_index.json"),
    ("sdxl", "holds a StableDiffusionXLPipeline, not a StableDiffusionPipeline; load it with"),
    ("other-pipeline", "holds a KandinskyPipeline, not a StableDiffusionPipeline"),
    ("truncated-weights", "weights are missing, not safetensors, or corrupt"),
    ("pickle-only", "weights are missing, not safetensors, or corrupt"),
    ("file", "is a file"),
])
def test_bad_folders_raise_user_errors(tiny_sd_folder, tmp_path, how, fragment):
    target = broken(tiny_sd_folder, tmp_path, how)
    with pytest.raises(UserError, match=fragment):
        StableDiffusionAdapter.from_pretrained(target, device="cpu")
    if how in ("other-pipeline", "truncated-weights"):
        with pytest.raises(UserError, match=fragment):
            load_adapter(str(target), device="cpu")
    if how == "sdxl":  # load_adapter picks the SDXL adapter, which reports the folder's missing weights
        with pytest.raises(UserError, match="StableDiffusionXLPipeline .* weights are missing"):
            load_adapter(str(target), device="cpu")


def test_hub_ids_load_from_the_cache_offline(tiny_sd_folder, tmp_path, monkeypatch):
    import huggingface_hub.constants

    # A Hub cache holding one snapshot, laid out as huggingface_hub writes it.
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--some-org--tiny-sd"
    shutil.copytree(tiny_sd_folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    adapter, folder = load_adapter("some-org/tiny-sd", device="cpu")
    assert isinstance(adapter, StableDiffusionAdapter) and folder is None
    identity = adapter.model_identity()
    assert (identity["source"], identity["revision"]) == ("some-org/tiny-sd", revision)
    assert identity["config_sha256"] == adapter_from(tiny_sd_folder).model_identity()["config_sha256"]
    with pytest.raises(UserError, match="set HF_HUB_OFFLINE=0"):
        load_adapter("no-such-org/no-such-model")
    with pytest.raises(UserError, match="neither an existing folder nor a Hub id"):
        StableDiffusionAdapter.from_pretrained("/no/such/folder")


def test_pixel_model_selections(tiny_adapter):
    full = dict(tiny_adapter.trainable_parameters("full"))
    cross = dict(tiny_adapter.trainable_parameters("cross-attention"))
    non_cross = dict(tiny_adapter.trainable_parameters("non-cross-attention"))
    assert set(cross) | set(non_cross) == set(full) and not set(cross) & set(non_cross)
    with pytest.raises(UserError, match="Stable Diffusion models only"):
        tiny_adapter.trainable_parameters("lora")


LOSS_TINY = 1.152108
SAMPLE_MEAN = -0.121311
