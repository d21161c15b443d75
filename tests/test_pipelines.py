"""Today's pipelines on their tiny presets: SD3 (MMDiT, flow matching), SDXL (two text encoders,
pooled and size/crop conditions) and FLUX.1 (packed latents, guidance embedding, CLIP + T5). Per
family: every method for two steps and the cross-attention selection through the CLI, the LoRA round
trip through diffusers' loader, the embedding and prompt attacks. For SD3 also the training terms by hand and the
timestep density; for SDXL the conditions the UNet gets; for FLUX the packing and its density; and the
published sizes of the real presets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffunlearn import cli
from diffunlearn.families import model_kind
from diffunlearn.methods import METHODS
from diffunlearn.models import FluxAdapter, StableDiffusion3Adapter, StableDiffusionXLAdapter, load_adapter

# family -> (fixture of its tiny folder, trained network's folder, pipeline class, adapter class)
FAMILIES = {"sd3": ("tiny_sd3_folder", "transformer", "StableDiffusion3Pipeline", StableDiffusion3Adapter),
            "sdxl": ("tiny_sdxl_folder", "unet", "StableDiffusionXLPipeline", StableDiffusionXLAdapter),
            "flux": ("tiny_flux_folder", "transformer", "FluxPipeline", FluxAdapter)}

COMMON = ["num_pairs=8", "batch_size=4", "steps=2", "data_steps=2", "eval_steps=2", "eval_prompts=2", "lr=1e-3",
          "margin=4.0", "threads=1"]


def run(*args: str) -> int:
    return cli.main([*args, "--quiet"])


@pytest.fixture(scope="module")
def adapter(tiny_sd3_folder) -> StableDiffusion3Adapter:
    model, _ = load_adapter(str(tiny_sd3_folder), device="cpu")
    return model


@pytest.fixture(scope="module")
def sd3_data(tiny_sd3_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sd3-data") / "nudity"
    assert run("data", "build", f"model={tiny_sd3_folder}", "num_pairs=8", "batch_size=4", "data_steps=2",
               "threads=1", "--out", str(out)) == 0
    return out


def network_weights(folder: Path, part: str = "transformer") -> dict[str, torch.Tensor]:
    return load_file(str(folder / part / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, tiny folder, its training data folder, network part, pipeline class, adapter class)."""
    fixture, part, pipeline, adapter_class = FAMILIES[request.param]
    folder = request.getfixturevalue(fixture)
    data = tmp_path_factory.mktemp(f"{request.param}-data") / "nudity"
    assert run("data", "build", f"model={folder}", "num_pairs=8", "batch_size=4", "data_steps=2", "threads=1",
               "--out", str(data)) == 0
    return request.param, folder, data, part, pipeline, adapter_class


def test_an_sd3_folder_is_its_own_family_with_its_recipe(tiny_sd3_folder, adapter):
    from diffunlearn.config import build_config

    assert model_kind(str(tiny_sd3_folder)) == "sd3" and isinstance(adapter, StableDiffusion3Adapter)
    assert adapter.family == "sd3" and adapter.text_encoders[2] is None   # saved without T5
    cfg = build_config(None, [f"model={tiny_sd3_folder}"])
    assert (cfg.concept, cfg.eval_steps, cfg.eval_guidance, cfg.lr) == ("nudity", 28, 7.0, 1e-5)


def test_flow_matching_training_terms_by_hand(adapter):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 16, 16, generator=gen)
    noise = torch.randn(3, 4, 16, 16, generator=gen)
    t = torch.tensor([1000.0, 500.0, 25.0])
    x_t, target, weight = adapter.training_terms(x0, noise, t)
    sigma = torch.tensor([1.0, 0.5, 0.025]).view(3, 1, 1, 1)
    assert torch.allclose(x_t, (1 - sigma) * x0 + sigma * noise, atol=1e-6)
    assert torch.equal(target, noise - x0) and weight is None
    assert torch.allclose(x_t[0], noise[0]) and torch.allclose(x_t[2], 0.975 * x0[2] + 0.025 * noise[2], atol=1e-6)


def test_timesteps_follow_the_logit_normal_density_through_the_shifted_schedule(adapter):
    t = adapter.draw_timesteps(20000, torch.Generator().manual_seed(1))
    again = adapter.draw_timesteps(20000, torch.Generator().manual_seed(1))
    assert torch.equal(t, again)                                   # the run's generator alone decides
    z = torch.randn(20000, generator=torch.Generator().manual_seed(1))
    index = (torch.sigmoid(z) * 1000).long()
    assert torch.equal(t, adapter.train_scheduler.timesteps[index])
    sigma = t / 1000
    assert 0 < float(sigma.min()) and float(sigma.max()) <= 1
    # shift 3 maps the logit-normal median u = 0.5 to σ = 3·0.5 / (1 + 2·0.5) = 0.75.
    assert float(sigma.median()) == pytest.approx(0.75, abs=0.01)


def test_the_cross_attention_selection_is_the_text_side_projections(adapter):
    clone = adapter.clone()
    chosen = [n for n, _ in clone.trainable_parameters("cross-attention")]
    assert chosen and all(any(f".{p}." in n for p in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"))
                          for n in chosen)
    rest = [n for n, _ in clone.trainable_parameters("non-cross-attention")]
    total = sum(1 for _ in clone.unet.named_parameters())
    assert len(chosen) + len(rest) == total and not set(chosen) & set(rest)


# Every registered method on SD3; on SDXL and FLUX (whose conditions, not methods, differ) one of each
# kind: the projection rule, the plain sum, a torchjd weighting, the cone-restricted step, ESD's
# target with its cross-attention variant, SalUn's mask and remap. (Keeps `make test` in its budget.)
REPRESENTATIVE = ("rg", "graddiff", "upgrad", "rg-opt", "esd-x", "salun")
# UCE edits UNet cross-attention in closed form: SDXL yes, SD3 and FLUX are refused (tests/test_uce.py).
# dualproj, imtlg and aligned-mtl share upgrad's and mgda's code path (methods/jd.py) and run on the
# digit world in tests/test_torchjd_rules.py; left out here for make test's 8-minute budget.
RUNS = ([("sd3", m) for m in METHODS if m not in ("rg-flat", "uce", "dualproj", "imtlg", "aligned-mtl")]
        + [(f, m) for f in ("sdxl", "flux") for m in REPRESENTATIVE] + [("sdxl", "uce")])


@pytest.mark.parametrize("family, method", RUNS, indirect=["family"])
def test_every_method_runs_through_the_cli(family, tmp_path, method):
    name, folder, data, part, pipeline, adapter_class = family
    out = tmp_path / "run"
    assert run("unlearn", f"model={folder}", f"method={method}", f"data_dir={data}", *COMMON, "--out", str(out)) == 0
    results = json.loads((out / "results.json").read_text())
    if method == "uce":  # one closed-form edit of SDXL's attn2 keys and values (both encoders' states)
        assert results["training"]["steps"] == 1 and results["training"]["final_forget_loss"] is None
    else:
        assert results["training"]["steps"] == 2 and np.isfinite(results["training"]["final_forget_loss"])
        assert results["training"]["final_remain_loss"] > 0
    base, after = network_weights(folder, part), network_weights(out / "model", part)
    assert any(not torch.equal(base[k], after[k]) for k in base)
    card = (out / "model" / "README.md").read_text()
    assert f"{pipeline}.from_pretrained" in card
    reloaded, _ = load_adapter(str(out / "model"), device="cpu")   # the saved pipeline loads as its family again
    assert type(reloaded) is adapter_class and reloaded.family == name


def test_the_cross_attention_run_trains_only_the_text_attention(family, tmp_path):
    name, folder, data, part, _, adapter_class = family
    out = tmp_path / "xattn"
    assert run("unlearn", f"model={folder}", "selection=cross-attention", f"data_dir={data}", *COMMON,
               "--out", str(out)) == 0
    base, after = network_weights(folder, part), network_weights(out / "model", part)
    changed = {k for k in base if not torch.equal(base[k], after[k])}
    assert changed and all(adapter_class.is_cross_attention(k) for k in changed)
    assert all(".attn2." in k for k in changed) if name == "sdxl" else all(".add_" in k or "to_add_out" in k
                                                                             for k in changed)
    if name == "flux":  # only the double-stream blocks have a text side of their own
        assert all(k.startswith("transformer_blocks.") for k in changed)


def test_lora_loads_in_diffusers_and_reproduces_the_trained_model(family, tmp_path):
    import diffusers

    name, folder, data, _, pipeline, adapter_class = family
    out = tmp_path / "lora"
    assert run("unlearn", f"model={folder}", "selection=lora", "lora_rank=4", "lora_alpha=8",
               f"data_dir={data}", *COMMON, "lr=5e-2", "--out", str(out)) == 0
    assert json.loads((out / "results.json").read_text())["model"]["format"] == "lora"
    absent = {"text_encoder_3": None, "tokenizer_3": None} if name == "sd3" else {}
    pipe = getattr(diffusers, pipeline).from_pretrained(folder, **absent)
    pipe.load_lora_weights(out / "model")
    reloaded = adapter_class.from_pipeline(pipe, device="cpu")
    request = json.loads((out / "samples" / "unlearned" / "request.json").read_text())
    images = reloaded.sample(request["prompts"], request["seeds"], steps=request["steps"],
                             guidance=request["guidance"])
    as_uint8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy().astype(int)

    def pngs(where: Path) -> np.ndarray:
        return np.stack([np.asarray(Image.open(p)) for p in sorted((where / "images").glob("*.png"))]).astype(int)

    trained, base = pngs(out / "samples" / "unlearned"), pngs(out / "samples" / "base")
    assert np.abs(as_uint8 - trained).max() <= 1   # diffusers' loader gives the model at the end of training
    assert np.abs(trained - base).max() > 2         # and the LoRA changed it


def test_the_embedding_and_prompt_attacks_run_on_every_family(family, tmp_path):
    """The embedding inversion, Ring-A-Bell, the paraphrases, and the prompt attack through several text
    encoders: its suffix is
    searched in one encoder (OpenCLIP-G, CLIP-G, T5), straight-through at the suffix's positions, while
    every encoder reads the projected words as text."""
    from diffunlearn.attacks.prompt import allowed_token_ids, attacked_prompt, input_embedding_modules, suffix_positions

    name, folder, data, *_ = family
    out = tmp_path / "run"
    assert run("unlearn", f"model={folder}", f"data_dir={data}", *COMMON, "--out", str(out)) == 0
    assert run("attack", str(out), "--attacks", "embedding,prompt,ring-a-bell,paraphrase", "--n", "2", "--steps", "2",
               "--option",
               "embedding.iterations=3", "--option", "prompt.iterations=3", "--option", "prompt.tokens=2",
               "--out", str(tmp_path / "attack")) == 0
    report = json.loads((tmp_path / "attack" / "results.json").read_text())
    for attack in ("embedding", "prompt", "ring-a-bell", "paraphrase"):
        assert 0.0 <= report["attacks"][attack]["asr"]["nudenet"] <= 1.0
    prompt = json.loads((tmp_path / "attack" / "attacks" / "prompt" / "result.json").read_text())
    assert len(prompt["details"]["suffix"].split()) == 2 and prompt["prompts"][0].endswith(prompt["details"]["suffix"])
    model, _ = load_adapter(str(out / "model"), device="cpu")
    states, pooled = model.condition_tensors(model.encode_prompts(["a nude person"]))
    assert states.shape[-1] == (32 if name == "flux" else 64) and pooled.shape[0] == 1   # token states; pooled
    with pytest.raises(Exception, match="encode_prompts_with_grad"):
        model.text_tokens()                                     # no single token path: says what is used instead
    # The searched encoder's suffix positions, replaced by the same words' table rows, give the text's own
    # encoding (forward) and a gradient to those rows (backward).
    tokenizer, encoder, length = model.suffix_encoder()
    suffix_ids = allowed_token_ids(tokenizer, round_trip=True)[10:12]
    texts = [attacked_prompt(p, tokenizer.decode(suffix_ids).strip()) for p in ("a nude person.", "a nude figure")]
    where = suffix_positions(tokenizer, texts, suffix_ids, length)
    assert where.sum(1).tolist() == [2, 2]
    table = encoder.get_input_embeddings()
    rows = table.weight.detach()[torch.tensor(suffix_ids)].clone().requires_grad_(True)

    def replace(module, inputs, output):
        output = output.clone()
        output[where] = rows.to(output.dtype).repeat(2, 1)
        return output

    handles = [m.register_forward_hook(replace) for m in input_embedding_modules(encoder)]
    try:
        hooked = model.encode_prompts_with_grad(texts)
    finally:
        for handle in handles:
            handle.remove()
    plain = model.encode_prompts(texts)
    for x, y in zip(model.condition_tensors(hooked), model.condition_tensors(plain)):
        assert (x - y).abs().max().item() <= 1e-5
    model.condition_tensors(hooked)[0].square().sum().backward()
    assert rows.grad is not None and rows.grad.abs().sum(1).min() > 0


def test_sdxl_conditions_carry_the_pooled_projection_and_the_size_ids(tiny_sdxl_folder):
    model, _ = load_adapter(str(tiny_sdxl_folder), device="cpu")
    assert model_kind(str(tiny_sdxl_folder)) == "sdxl" and isinstance(model, StableDiffusionXLAdapter)
    cond = model.encode_prompts(["a cat", "a dog"])
    assert cond.states.shape == (2, 77, 64) and cond.pooled.shape == (2, 32)
    assert cond.time_ids.tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2   # own size, no crop
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500])
    out = model.predict_noise(x, t, cond)
    shifted = model.predict_noise(x, t, type(cond)(cond.states, cond.pooled, cond.time_ids * 2))
    assert out.shape == x.shape and not torch.allclose(out, shifted)   # the size ids reach the UNet
    negative = model.negative_condition(1)
    assert float(negative.states.abs().max()) == 0.0   # SDXL's force_zeros_for_empty_prompt


def test_flux_packs_latents_and_draws_uniform_sigma(tiny_flux_folder):
    model, _ = load_adapter(str(tiny_flux_folder), device="cpu")
    assert model_kind(str(tiny_flux_folder)) == "flux" and isinstance(model, FluxAdapter)
    assert model.unet.config.guidance_embeds                     # the dev model's distilled guidance
    cond = model.encode_prompts(["a cat", "a dog"])
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900.0, 100.0])
    out = model.predict_noise(x, t, cond)
    assert out.shape == x.shape                                   # packed 2x2 for the transformer, unpacked back
    from diffusers import FluxPipeline

    packed = FluxPipeline._pack_latents(x, 2, 4, 16, 16)
    assert packed.shape == (2, 64, 16)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 32, 32, model.vae_scale_factor), x)
    # Uniform density through the unshifted training timesteps (FLUX shifts at sampling time only).
    sigma = model.draw_timesteps(20000, torch.Generator().manual_seed(2)) / 1000
    assert float(sigma.mean()) == pytest.approx(0.5, abs=0.01) and float(sigma.max()) <= 1
    x_t, target, weight = model.training_terms(x, x.flip(0), t)
    assert torch.allclose(x_t[0], 0.1 * x[0] + 0.9 * x[1], atol=1e-6) and torch.equal(target, x.flip(0) - x)


def test_the_real_presets_have_the_published_sizes():
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from diffunlearn.models.presets import flux_configs, sd3_configs, sdxl_configs

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        sizes = {preset: count(SD3Transformer2DModel(**sd3_configs(preset, 49408, {})[0]))
                 for preset in ("sd3-medium", "sd35-large")}
        unet_kw, _, _, clip_g = sdxl_configs("sdxl", 49408, {})
        sizes["sdxl"] = count(UNet2DConditionModel(**unet_kw))
        sizes["clip-g"] = count(CLIPTextModelWithProjection(CLIPTextConfig(**clip_g)))
        flux_kw, _, _, t5_kw = flux_configs("flux-dev", 49408, {})
        sizes["flux-dev"] = count(FluxTransformer2DModel(**flux_kw))
        sizes["t5-xxl"] = count(T5EncoderModel(T5Config(**t5_kw)))
    assert sizes["sd3-medium"] == pytest.approx(2.03e9, rel=0.02)    # "SD3 medium: 2 B parameters"
    assert sizes["sd35-large"] == pytest.approx(8.06e9, rel=0.02)    # "SD3.5 large: 8.1 B parameters"
    assert sizes["sdxl"] == 2567463684                                # SDXL base 1.0's UNet, exactly
    assert sizes["clip-g"] == pytest.approx(6.95e8, rel=0.01)        # OpenCLIP bigG's text tower with projection
    assert sizes["flux-dev"] == pytest.approx(1.19e10, rel=0.01)     # "FLUX.1 [dev]: 12 B parameters"
    assert sizes["t5-xxl"] == pytest.approx(4.76e9, rel=0.01)        # T5 v1.1 XXL's encoder
    # The CPU-benchmark layouts (diffunlearn bench --preset ...-small): a few million denoiser parameters.
    with torch.device("meta"):
        small = {"sd3": count(SD3Transformer2DModel(**sd3_configs("sd3-small", 1774, {})[0])),
                 "sdxl": count(UNet2DConditionModel(**sdxl_configs("sdxl-small", 1774, {})[0])),
                 "flux": count(FluxTransformer2DModel(**flux_configs("flux-small", 1774, {})[0]))}
    assert small == {"sd3": 13947408, "sdxl": 36528004, "flux": 9278480}


def test_the_sd3_recipe_file_runs_and_its_lora_run_is_evaluated(tiny_sd3_folder, sd3_data, tmp_path):
    """configs/sd3-nudity.yaml (LoRA on both sides of the joint attention) on the tiny model, then
    `diffunlearn eval` of the LoRA run: the base pipeline with the run's LoRA applied."""
    from diffunlearn.evaluate.clip import build_tiny_clip

    config = Path(__file__).resolve().parents[1] / "configs" / "sd3-nudity.yaml"
    out = tmp_path / "recipe"
    assert run("unlearn", str(config), f"model={tiny_sd3_folder}", f"data_dir={sd3_data}", *COMMON, "lr=5e-2",
               "mixed_precision=no", "lora_base_dtype=fp32", "gradient_checkpointing=false", "checkpoint_every=0",
               "--out", str(out)) == 0
    lora = load_file(str(out / "model" / "pytorch_lora_weights.safetensors"))
    assert any("add_k_proj" in k for k in lora) and any(".to_q." in k for k in lora)
    clip = build_tiny_clip(tmp_path / "clip", seed=0)
    args = ["--metrics", "alignment", "--prompts", "template:nudity:test:remain:3", "--clip-model", str(clip),
            "--steps", "2", "--guidance", "5", "--seed", "3", "--batch-size", "4"]
    assert run("eval", str(out), *args, "--out", str(out / "eval")) == 0
    assert run("eval", str(tiny_sd3_folder), *args, "--out", str(tmp_path / "base-eval")) == 0
    manifest = json.loads((out / "eval" / "manifest.json").read_text())
    assert manifest["model"]["class"] == "StableDiffusion3Pipeline" and manifest["model"]["lora"] == str(out / "model")
    after = json.loads((out / "eval" / "results.json").read_text())["metrics"]["alignment"]["remain"]["alignment"]
    before = json.loads((tmp_path / "base-eval" / "results.json").read_text())["metrics"]["alignment"]["remain"]
    assert -1 <= after <= 1 and after != before["alignment"]   # the LoRA was applied


@pytest.mark.parametrize("family", ["sd3", "flux"], indirect=True)
def test_a_flow_matching_run_resumes_to_the_same_weights(family, tmp_path, monkeypatch, crash_after_checkpoint):
    """The flow families draw σ from the run's own generator, so a resumed run continues the same stream:
    interrupted after step 2 of 4 and resumed, it ends bit-identical to an uninterrupted run."""
    name, folder, data, part, *_ = family
    args = [f"model={folder}", f"data_dir={data}", *COMMON, "steps=4", "checkpoint_every=1"]
    assert run("unlearn", *args, "--out", str(tmp_path / "straight")) == 0

    import diffunlearn.core.training as training

    real_save = crash_after_checkpoint(training, "save_checkpoint", at_step=2)
    assert run("unlearn", *args, "--out", str(tmp_path / "resumed")) == 130
    monkeypatch.setattr(training, "save_checkpoint", real_save)
    assert run("unlearn", "--resume", str(tmp_path / "resumed")) == 0
    a, b = network_weights(tmp_path / "straight" / "model", part), network_weights(tmp_path / "resumed" / "model", part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_the_prompt_attack_takes_an_offloaded_encoder_back_for_good(tiny_sd_folder):
    model, _ = load_adapter(str(tiny_sd_folder), device="cpu")
    moves: list[str] = []
    model.move_text_encoders = lambda device: moves.append(str(device))
    model.encoder_home = torch.device("meta")
    model.offload_text_encoders()
    tokenizer, encoder, length = model.text_tokens()    # it back-propagates through the encoder
    assert moves == ["meta", "cpu"] and not model.offload_encoders and encoder is model.text_encoder


@pytest.mark.parametrize("name", ["sd3", "sdxl", "flux"])
def test_offloaded_text_encoders_come_to_the_device_only_while_encoding(name, request):
    """offload_encoders: the encoders wait at ``encoder_home`` (the CPU on a GPU machine) and move to the
    adapter's device for each encoding call only. On this CPU-only machine the two are the same device,
    so the moves are recorded with ``encoder_home`` set to another device name instead of made."""
    model, _ = load_adapter(str(request.getfixturevalue(FAMILIES[name][0])), device="cpu")
    expected = model.encode_prompts(["a photo of a cat", "a red car"])
    encoders = model.text_encoder_modules()
    assert len(encoders) == 2 and all(e is not None for e in encoders)   # SD3 saved without T5, FLUX CLIP + T5
    moves: list[str] = []
    model.move_text_encoders = lambda device: moves.append(str(device))
    model.encoder_home = torch.device("meta")
    model.offload_text_encoders()
    assert moves == ["meta"]
    got = model.encode_prompts(["a photo of a cat", "a red car"])
    assert moves == ["meta", "cpu", "meta"]                             # in for the call, out after it
    assert torch.equal(got.states, expected.states) and torch.equal(got.pooled, expected.pooled)
    if name == "sdxl":
        model.negative_condition(1)
        assert moves[3:] == ["cpu", "meta"]                             # SDXL encodes "" for its negative


def test_offload_encoders_trains_the_same_model_and_is_refused_for_the_digit_world(tiny_sd3_folder, sd3_data,
                                                                                  tmp_path, capsys):
    args = [f"model={tiny_sd3_folder}", f"data_dir={sd3_data}", *COMMON, "checkpoint_every=0"]
    assert run("unlearn", *args, "--out", str(tmp_path / "plain")) == 0
    assert run("unlearn", *args, "offload_encoders=true", "--out", str(tmp_path / "offload")) == 0
    a, b = network_weights(tmp_path / "plain" / "model"), network_weights(tmp_path / "offload" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert run("unlearn", "offload_encoders=true", "steps=1", "--out", str(tmp_path / "pixel")) == 2
    assert "offload_encoders" in capsys.readouterr().err and not (tmp_path / "pixel").exists()


@pytest.mark.parametrize("family", ["sdxl", "flux"], indirect=True)
def test_the_sdxl_and_flux_recipe_files_run_with_their_memory_settings(family, tmp_path):
    """configs/sdxl-nudity.yaml and configs/flux-nudity.yaml on the tiny models, with their gradient
    checkpointing, encoder offload and (FLUX) micro-batches kept; fp32 instead of bf16 (autocast and
    the frozen base) on this CPU."""
    name, folder, data, part, *_ = family
    config = Path(__file__).resolve().parents[1] / "configs" / f"{name}-nudity.yaml"
    out = tmp_path / "recipe"
    assert run("unlearn", str(config), f"model={folder}", f"data_dir={data}", *COMMON, "lr=5e-2",
               "mixed_precision=no", "lora_base_dtype=fp32", "checkpoint_every=0", "--out", str(out)) == 0
    import yaml

    assert yaml.safe_load(config.read_text())["lora_base_dtype"] == "bf16"   # on a GPU: the base in bf16

    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["gradient_checkpointing"] is True and recorded["offload_encoders"] is True
    assert recorded["micro_batches"] == (4 if name == "flux" else 1) and recorded["selection"] == "lora"
    lora = load_file(str(out / "model" / "pytorch_lora_weights.safetensors"))
    assert any(".to_q." in k for k in lora) and (name != "flux" or any("add_k_proj" in k for k in lora))
    card = (out / "model" / "README.md").read_text()
    assert FAMILIES[name][2] + ".from_pretrained" in card


def test_a_lora_runs_frozen_base_can_live_in_bf16_while_its_adapters_train_in_fp32(tiny_sd3_folder):
    """``lora_base_dtype=bf16``: the base is loaded straight into bf16 (half its memory), the adapters
    stay fp32 and take the gradient under bf16 autocast; combinations that would round a saved or
    trained weight are refused."""
    from diffunlearn.config import build_config
    from diffunlearn.core.losses import denoising_loss
    from diffunlearn.errors import UserError
    from diffunlearn.jobs.runfolder import load_for_run

    settings = [f"model={tiny_sd3_folder}", "selection=lora", "mixed_precision=bf16", "device=cpu"]
    plain, _ = load_for_run(build_config(None, settings))
    adapter, _ = load_for_run(build_config(None, [*settings, "lora_base_dtype=bf16"]))
    assert adapter.unet.dtype == torch.bfloat16 and plain.unet.dtype == torch.float32   # loaded in bf16
    named = adapter.trainable_parameters("lora")
    plain.trainable_parameters("lora")
    assert named and all(p.dtype == torch.float32 for _, p in named)
    frozen = [p for n, p in adapter.unet.named_parameters() if "lora_" not in n]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)

    def nbytes(model):
        return sum(p.numel() * p.element_size() for n, p in model.unet.named_parameters() if "lora_" not in n)

    assert nbytes(adapter) * 2 == nbytes(plain)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn((2, *adapter.latent_shape), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = denoising_loss(adapter, x0, adapter.encode_prompts(["a nude person", "a person"]),
                              torch.randn(x0.shape, generator=gen), adapter.draw_timesteps(2, gen)).mean()
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and p.grad.dtype == torch.float32 for _, p in named)
    assert any(p.grad.abs().max() > 0 for _, p in named) and all(p.grad is None for p in frozen)
    for extra, word in ((["selection=full"], "selection=lora"), (["mixed_precision=no"], "mixed_precision=bf16"),
                        (["save=pipeline"], "save=lora")):
        with pytest.raises(UserError, match=word):
            build_config(None, [*settings, "lora_base_dtype=bf16", *extra])
