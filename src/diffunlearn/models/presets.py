"""Stable Diffusion pipelines with RANDOM weights, built from configs alone (nothing is downloaded).

They serve tests (``tiny``), CPU benchmarks (``small``) and memory/speed checks at the real sizes
(``sd15``, ``sd21``: the exact UNet, VAE and text-encoder configs of Stable Diffusion v1.5 and 2.1).
Every preset uses the committed CLIP tokenizer (``assets/clip-tokenizer``, see
``scripts/make_tokenizer.py``). For ``sd15``/``sd21`` the text encoder keeps CLIP's real vocabulary
size (49,408) so that its shapes and parameter count are the real ones; the committed tokenizer's
1,774 ids are a subset of that range (unused rows of the embedding simply stay untouched). Its ids do
NOT coincide with the real CLIP vocabulary, so these presets can never be paired with real weights.

Usage::

    pipe = build_pipeline("tiny", seed=0)              # in memory
    folder = init_pipeline("small", "runs/small-init")  # saved as safetensors, loads with from_pretrained
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import UserError
from .assets import CLIP_TOKENIZER, asset_path

if TYPE_CHECKING:  # heavy imports stay lazy at run time
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

PRESETS: dict[str, str] = {
    "tiny": "test-sized SD layout: 32x32 images, 16x16x4 latents, 0.79 M-parameter UNet, 2-layer text encoder",
    "small": "CPU-benchmark SD layout: 64x64 images, 16x16x4 latents, 35 M-parameter UNet, 4-layer text encoder",
    "sd15": "Stable Diffusion v1.5 configs (860 M UNet, CLIP ViT-L/14 text encoder, 512x512), random weights",
    "sd21": "Stable Diffusion 2.1 configs (865 M UNet, OpenCLIP ViT-H text encoder, 768x768, v-prediction), "
            "random weights",
    "sdxl-tiny": "test-sized SDXL layout: 32x32 images, 16x16x4 latents, two 2-layer CLIP encoders, text_time "
                 "conditioning",
    "sdxl-small": "CPU-benchmark SDXL layout: 64x64 images, 16x16x4 latents, two 4-layer CLIP encoders",
    "sdxl": "Stable Diffusion XL base 1.0 configs (2.57 B UNet, CLIP-L + OpenCLIP bigG, 1024x1024), random weights",
    "flux-tiny": "test-sized FLUX layout: 32x32 images, 16x16x4 latents packed 2x2, one double- and one "
                 "single-stream block, guidance embedding, 2-layer CLIP and T5 encoders",
    "flux-small": "CPU-benchmark FLUX layout: 64x64 images, 16x16x4 latents, 2 double- + 4 single-stream blocks",
    "flux-dev": "FLUX.1 dev configs (11.9 B transformer, CLIP-L, T5-XXL 4.8 B, guidance-distilled), random weights",
    "sd3-tiny": "test-sized SD3 layout: 32x32 images, 16x16x4 latents, 2-block MMDiT (80 K parameters), two "
                "2-layer CLIP encoders, no T5",
    "sd3-small": "CPU-benchmark SD3 layout: 64x64 images, 16x16x4 latents, 6-block MMDiT, two 4-layer CLIP encoders",
    "sd3-medium": "Stable Diffusion 3 medium configs (2.0 B MMDiT, 16-channel VAE, CLIP-L + CLIP-G, 1024x1024), "
                  "random weights, T5 left out",
    "sd35-large": "Stable Diffusion 3.5 large configs (8.1 B MMDiT with QK RMS-norm, CLIP-L + CLIP-G), random "
                  "weights, T5 left out",
}
SD3_PRESETS = ("sd3-tiny", "sd3-small", "sd3-medium", "sd35-large")
SDXL_PRESETS = ("sdxl-tiny", "sdxl-small", "sdxl")
FLUX_PRESETS = ("flux-tiny", "flux-small", "flux-dev")
# The CPU-benchmark layouts of the new families: 64x64 images, 16x16x4 latents (as SD's "small"),
# 256-wide text encoders, a few million denoiser parameters.
SMALL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
                 down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                 norm_num_groups=32, sample_size=64)


# The published text encoders of SDXL and SD3: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 (with projection),
# CLIP's legacy special ids and full vocabulary size (so shapes and parameter counts are the real ones).
CLIP_IDS = dict(bos_token_id=0, pad_token_id=1, eos_token_id=2)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768,
              vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", **CLIP_IDS)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, vocab_size=49408, max_position_embeddings=77, hidden_act="gelu", **CLIP_IDS)


def _small_clip(vocab_size: int, special_ids: dict[str, int]) -> dict:
    return dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, projection_dim=256,
                vocab_size=vocab_size, max_position_embeddings=77, hidden_act="quick_gelu", **special_ids)
# FLUX's scheduler: shift 3.0, resolution-dependent (dynamic) shift at sampling time.
FLUX_SCHEDULE = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                 "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
# The SD3 flow-matching schedule: FlowMatchEulerDiscreteScheduler, 1000 steps, shift 3.0.
SD3_SCHEDULE = {"num_train_timesteps": 1000, "shift": 3.0}

# The SD noise schedule (v1.x and v2.x): betas linear in sqrt space from 0.00085 to 0.012, 1000 steps.
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
               "beta_schedule": "scaled_linear"}

# SD's UNet layout: cross-attention at the three finest resolutions, none at the coarsest.
SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


def load_tokenizer() -> CLIPTokenizer:
    """The committed byte-level BPE CLIP tokenizer (1,774 tokens, 77 positions) as a ``CLIPTokenizer``."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(asset_path(CLIP_TOKENIZER)))


def _configs(preset: str, vocab_size: int, special_ids: dict[str, int]) -> tuple[dict, dict, dict, str]:
    """(unet kwargs, vae kwargs, CLIPTextConfig kwargs, prediction type) of a preset."""
    if preset == "tiny":
        unet = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                    norm_num_groups=8, attention_head_dim=4, cross_attention_dim=32)
        # Two encoder blocks = one 2x downsampling: 32x32 images <-> 16x16 latents.
        vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                   down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                   norm_num_groups=8, sample_size=32)
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    projection_dim=32, vocab_size=vocab_size, max_position_embeddings=77, hidden_act="quick_gelu",
                    **special_ids)
        return unet, vae, text, "epsilon"
    if preset == "small":
        unet = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
                    block_out_channels=(128, 256, 256),
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                    norm_num_groups=32, attention_head_dim=8, cross_attention_dim=256)
        # Three encoder blocks = 4x downsampling: 64x64 images <-> 16x16 latents.
        vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64),
                   layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 3,
                   up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=32, sample_size=64)
        text = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                    projection_dim=256, vocab_size=vocab_size, max_position_embeddings=77, hidden_act="quick_gelu",
                    **special_ids)
        return unet, vae, text, "epsilon"
    # The published configs: runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1.
    sd_vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                  layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, act_fn="silu",
                  scaling_factor=0.18215)
    sd_unet = dict(in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                   down_block_types=SD_DOWN, up_block_types=SD_UP, norm_num_groups=32, norm_eps=1e-5,
                   act_fn="silu", flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1)
    # Both text configs keep CLIP's legacy special ids (bos 0, pad 1, eos 2), as published; with them
    # transformers pools at the largest id, which is <|endoftext|> in the committed tokenizer too.
    clip_ids = dict(bos_token_id=0, pad_token_id=1, eos_token_id=2)
    if preset == "sd15":
        unet = dict(sd_unet, sample_size=64, attention_head_dim=8, cross_attention_dim=768)
        text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    projection_dim=768, vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                    **clip_ids)
        return unet, dict(sd_vae, sample_size=512), text, "epsilon"
    if preset == "sd21":
        # SD 2.x's `attention_head_dim` list is really a head COUNT per block (diffusers' legacy name):
        # 320/5 = 640/10 = 1280/20 = 64 channels per head.
        unet = dict(sd_unet, sample_size=96, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                    use_linear_projection=True, upcast_attention=True)
        # OpenCLIP ViT-H/14's text tower without its last layer (SD 2 conditions on the penultimate one).
        text = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                    projection_dim=512, vocab_size=49408, max_position_embeddings=77, hidden_act="gelu", **clip_ids)
        return unet, dict(sd_vae, sample_size=768), text, "v_prediction"
    raise UserError(f"unknown model preset {preset!r}; use one of: {', '.join(PRESETS)}")


def sd3_configs(preset: str, vocab_size: int, special_ids: dict[str, int]) -> tuple[dict, dict, dict, dict]:
    """(transformer kwargs, vae kwargs, CLIP-L kwargs, CLIP-G kwargs) of an SD3 preset: the published
    ``stabilityai/stable-diffusion-3-medium-diffusers`` and ``stable-diffusion-3.5-large`` configs, or
    the tiny test layout. The T5 encoder is left out (there is no offline T5 tokenizer; the pipeline
    conditions on zeros in its place, as diffusers does when T5 is dropped to save memory)."""
    if preset == "sd3-tiny":
        # CLIP widths 32 + 32 side by side = the joint attention width 64; the pooled projections too.
        transformer = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                           num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
                           pooled_projection_dim=64, out_channels=4, pos_embed_max_size=16)
        vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                   down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                   norm_num_groups=8, sample_size=32, scaling_factor=1.5305, shift_factor=0.0609)
        clip = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
                    vocab_size=vocab_size, max_position_embeddings=77, hidden_act="quick_gelu", **special_ids)
        return transformer, vae, clip, dict(clip)
    if preset == "sd3-small":
        transformer = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=6, attention_head_dim=32,
                           num_attention_heads=8, joint_attention_dim=512, caption_projection_dim=256,
                           pooled_projection_dim=512, out_channels=4, pos_embed_max_size=16)
        clip = _small_clip(vocab_size, special_ids)
        return transformer, dict(SMALL_VAE, scaling_factor=1.5305, shift_factor=0.0609), clip, dict(clip)
    if preset not in ("sd3-medium", "sd35-large"):
        raise UserError(f"unknown model preset {preset!r}; use one of: {', '.join(PRESETS)}")
    clip_l, clip_g = dict(CLIP_L), dict(CLIP_G)
    vae = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
               layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=1024,
               scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    mmdit = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
                 joint_attention_dim=4096, pooled_projection_dim=2048, pos_embed_max_size=192)
    if preset == "sd3-medium":
        return dict(mmdit, num_layers=24, num_attention_heads=24, caption_projection_dim=1536), vae, clip_l, clip_g
    return (dict(mmdit, num_layers=38, num_attention_heads=38, caption_projection_dim=2432, qk_norm="rms_norm"),
            vae, clip_l, clip_g)


def sdxl_configs(preset: str, vocab_size: int, special_ids: dict[str, int]) -> tuple[dict, dict, dict, dict]:
    """(unet kwargs, vae kwargs, CLIP-L kwargs, CLIP-G kwargs) of an SDXL preset: the published
    ``stabilityai/stable-diffusion-xl-base-1.0`` configs or the tiny test layout. The UNet's added
    condition input is the pooled projection plus six size/crop ids of ``addition_time_embed_dim`` each."""
    if preset == "sdxl-tiny":
        unet = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8, attention_head_dim=4,
                    cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=32 + 6 * 8)
        vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                   down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                   norm_num_groups=8, sample_size=32, scaling_factor=0.13025)
        clip = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
                    vocab_size=vocab_size, max_position_embeddings=77, hidden_act="quick_gelu", **special_ids)
        return unet, vae, clip, dict(clip)
    if preset == "sdxl-small":
        unet = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
                    block_out_channels=(128, 256, 256),
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=32,
                    attention_head_dim=8, cross_attention_dim=512, addition_embed_type="text_time",
                    addition_time_embed_dim=32, projection_class_embeddings_input_dim=256 + 6 * 32)
        clip = _small_clip(vocab_size, special_ids)
        return unet, dict(SMALL_VAE, scaling_factor=0.13025), clip, dict(clip)
    if preset != "sdxl":
        raise UserError(f"unknown model preset {preset!r}; use one of: {', '.join(PRESETS)}")
    clip_l, clip_g = dict(CLIP_L), dict(CLIP_G)
    unet = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816, norm_num_groups=32)
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
               layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025)
    return unet, vae, clip_l, clip_g


def flux_configs(preset: str, vocab_size: int, special_ids: dict[str, int]) -> tuple[dict, dict, dict, dict]:
    """(transformer kwargs, vae kwargs, CLIP-L kwargs, T5 kwargs) of a FLUX preset: the published
    ``black-forest-labs/FLUX.1-dev`` configs or the tiny test layout. The committed CLIP BPE tokenizer
    stands in for T5's sentencepiece tokenizer, which cannot be built offline (the T5 of ``flux-dev``
    keeps T5's real vocabulary size, so its shapes and parameter count are the real ones)."""
    if preset == "flux-tiny":
        transformer = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                           num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                           guidance_embeds=True, axes_dims_rope=(2, 2, 4))
        vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                   down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                   norm_num_groups=8, sample_size=32, scaling_factor=0.3611, shift_factor=0.1159,
                   use_quant_conv=False, use_post_quant_conv=False)
        clip = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
                    vocab_size=vocab_size, max_position_embeddings=77, hidden_act="quick_gelu", **special_ids)
        t5 = dict(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                  pad_token_id=special_ids.get("pad_token_id", 0), eos_token_id=special_ids.get("eos_token_id", 1),
                  decoder_start_token_id=special_ids.get("pad_token_id", 0))
        return transformer, vae, clip, t5
    if preset == "flux-small":
        transformer = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=32,
                           num_attention_heads=8, joint_attention_dim=256, pooled_projection_dim=256,
                           guidance_embeds=True, axes_dims_rope=(8, 12, 12))
        t5 = dict(vocab_size=vocab_size, d_model=256, d_kv=32, d_ff=1024, num_layers=4, num_heads=8,
                  pad_token_id=special_ids.get("pad_token_id", 0), eos_token_id=special_ids.get("eos_token_id", 1),
                  decoder_start_token_id=special_ids.get("pad_token_id", 0))
        vae = dict(SMALL_VAE, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                   use_post_quant_conv=False)
        return transformer, vae, _small_clip(vocab_size, special_ids), t5
    if preset != "flux-dev":
        raise UserError(f"unknown model preset {preset!r}; use one of: {', '.join(PRESETS)}")
    transformer = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                       num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                       guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    vae = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
               layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=1024,
               scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    clip = dict(CLIP_L)
    t5 = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return transformer, vae, clip, t5


def _random_parts(preset: str, configs: Any, makers: tuple) -> tuple[Any, list]:
    """The committed tokenizer and a preset's modules with random weights: ``configs(preset, vocab size,
    special ids)`` gives one kwargs dict per module, ``makers[i](kwargs)`` builds module i (in this
    order, after the caller's ``torch.manual_seed``), each left in eval mode."""
    tokenizer = load_tokenizer()
    special_ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    kwargs = configs(preset, len(tokenizer), special_ids)
    modules = [make(kw).eval() for make, kw in zip(makers, kwargs)]
    return tokenizer, modules


def build_sdxl_pipeline(preset: str, seed: int = 0) -> Any:
    """A ``StableDiffusionXLPipeline`` with random weights (after ``torch.manual_seed(seed)``), fp32, CPU,
    with SDXL's Euler scheduler config."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer, (unet, vae, text_encoder, text_encoder_2) = _random_parts(preset, sdxl_configs, (
        lambda kw: UNet2DConditionModel(**kw), lambda kw: AutoencoderKL(**kw),
        lambda kw: CLIPTextModel(CLIPTextConfig(**kw)), lambda kw: CLIPTextModelWithProjection(CLIPTextConfig(**kw))))
    scheduler = EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="leading", steps_offset=1,
                                       prediction_type="epsilon")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)


def build_flux_pipeline(preset: str, seed: int = 0) -> Any:
    """A ``FluxPipeline`` with random weights (after ``torch.manual_seed(seed)``), fp32, CPU."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer, (transformer, vae, clip, t5) = _random_parts(preset, flux_configs, (
        lambda kw: FluxTransformer2DModel(**kw), lambda kw: AutoencoderKL(**kw),
        lambda kw: CLIPTextModel(CLIPTextConfig(**kw)), lambda kw: T5EncoderModel(T5Config(**kw))))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULE), vae=vae, text_encoder=clip,
                        tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer, transformer=transformer)


def build_sd3_pipeline(preset: str, seed: int = 0) -> Any:
    """A ``StableDiffusion3Pipeline`` with random weights (after ``torch.manual_seed(seed)``), fp32, CPU."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer, (transformer, vae, clip_l, clip_g) = _random_parts(preset, sd3_configs, (
        lambda kw: SD3Transformer2DModel(**kw), lambda kw: AutoencoderKL(**kw),
        lambda kw: CLIPTextModelWithProjection(CLIPTextConfig(**kw)),
        lambda kw: CLIPTextModelWithProjection(CLIPTextConfig(**kw))))
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULE),
                                    vae=vae, text_encoder=clip_l, tokenizer=tokenizer, text_encoder_2=clip_g,
                                    tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)


def build_pipeline(preset: str, seed: int = 0, prediction_type: str | None = None) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` with random weights drawn after ``torch.manual_seed(seed)``.

    Args:
        preset: a key of ``PRESETS``.
        seed: the weights are a deterministic function of (preset, seed, library versions).
        prediction_type: override the preset's (``"epsilon"`` or ``"v_prediction"``), e.g. a tiny
            v-prediction model for tests.

    Returns:
        The pipeline in fp32 on the CPU, with no safety checker. SD 1.x presets use SD 1.5's
        ``PNDMScheduler`` config, ``sd21`` SD 2.1's ``DDIMScheduler`` config.

    Raises:
        UserError: unknown preset or prediction type.
    """
    if preset in SD3_PRESETS:
        if prediction_type is not None:
            raise UserError("SD3 presets are flow-matching models; they take no prediction type")
        return build_sd3_pipeline(preset, seed)
    if preset in SDXL_PRESETS:
        return build_sdxl_pipeline(preset, seed)
    if preset in FLUX_PRESETS:
        return build_flux_pipeline(preset, seed)
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = load_tokenizer()
    special_ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    unet_kw, vae_kw, text_kw, default_prediction = _configs(preset, len(tokenizer), special_ids)
    prediction = prediction_type or default_prediction
    if prediction not in ("epsilon", "v_prediction"):
        raise UserError(f"unknown prediction type {prediction!r}; use epsilon or v_prediction")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_kw)
    vae = AutoencoderKL(**vae_kw)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_kw))
    for module in (unet, vae, text_encoder):
        module.eval()
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=make_scheduler(preset, prediction), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def make_scheduler(preset: str, prediction_type: str | None = None) -> Any:
    """The scheduler a preset ships: SD 2.1's ``DDIMScheduler`` (v-prediction) for ``sd21``, SD 1.5's
    ``PNDMScheduler`` (ε-prediction) otherwise; ``prediction_type`` overrides the preset's."""
    from diffusers import DDIMScheduler, PNDMScheduler

    if preset == "sd21":
        return DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                             prediction_type=prediction_type or "v_prediction")
    return PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
                         prediction_type=prediction_type or "epsilon")


def init_pipeline(preset: str, out_folder: str | os.PathLike, seed: int = 0,
                  prediction_type: str | None = None, dtype: str | None = None,
                  device: str | None = None) -> Path:
    """Build ``preset`` (see ``build_pipeline``) and save it as a diffusers folder (safetensors).

    Args:
        dtype: save the weights in ``fp32`` (default), ``bf16`` or ``fp16``: FLUX.1-dev's 16.7 B
            parameters take 67 GB in fp32 and 33 GB in bf16.
        device: build (and randomly initialise) the networks there, e.g. ``cuda``: initialising
            billions of weights takes minutes on a CPU and seconds on a GPU. The weights then depend
            on that device's random generator as well as on ``seed``.

    Returns:
        ``out_folder``, which ``StableDiffusionPipeline.from_pretrained`` and ``load_adapter`` load.

    Raises:
        UserError: unknown dtype, or ``device=cuda`` without a GPU.
    """

    dtypes = {None: None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in dtypes:
        raise UserError(f"unknown dtype {dtype!r}; choose fp32, bf16 or fp16")
    if device not in (None, "cpu") and device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device} was asked for but torch sees no CUDA GPU; omit it to build on the CPU")
    folder = Path(out_folder)
    with torch.device(device or "cpu"):
        pipe = build_pipeline(preset, seed, prediction_type)
    if dtypes[dtype] is not None:
        pipe.to(dtypes[dtype])
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
