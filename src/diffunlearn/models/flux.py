"""FLUX.1 (rectified flow, double- and single-stream transformer) behind the adapter protocol (issue 15).

The adapter holds a diffusers ``FluxPipeline``'s components: the ``FluxTransformer2DModel`` (kept as
``self.unet``, trained), the VAE, the CLIP-L encoder (its pooled output conditions the transformer's
modulation) and the T5 encoder (its token states are the text sequence), all frozen. A condition is
``(T5 token states, pooled CLIP)``; the text position ids are zeros, as the pipeline makes them.

Training follows diffusers' ``train_dreambooth_flux.py`` with its defaults: the training data are
unpacked latents ``(mean − shift_factor) · scaling_factor``; σ is drawn UNIFORMLY (weighting scheme
``none``) through the scheduler's timesteps (FLUX's scheduler shifts dynamically at sampling time, so
its training timesteps are unshifted); x_t = (1 − σ)·x₀ + σ·ε, target ε − x₀. The transformer sees
x_t packed into 2×2 patches with their image position ids, the timestep as σ (t / 1000) and, for the
guidance-distilled dev model, the guidance embedding at the scripts' 3.5; its output is unpacked
before the loss, so every method sees latents of the usual shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .sd import absent_components, uses_text_encoders
from .sd3 import SD3Condition, StableDiffusion3Adapter

PIPELINE_CLASS = "FluxPipeline"
CONFIG_FILES = ("model_index.json", "transformer/config.json", "vae/config.json", "text_encoder/config.json",
                "text_encoder_2/config.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json",
                "tokenizer_2/tokenizer_config.json")
TRAIN_GUIDANCE = 3.5  # the guidance embedding during training (diffusers' FLUX scripts' default)


class FluxCondition(SD3Condition):
    """Encoded prompts: T5 token states ``(N, L, D)`` and pooled CLIP ``(N, P)``."""


class FluxAdapter(StableDiffusion3Adapter):
    """Adapter for diffusers ``FluxPipeline`` models (FLUX.1 dev and schnell, and their fine-tunes).

    Shares the rectified-flow terms, the latent encoding, LoRA, the parameter selections
    (cross-attention = the double-stream blocks' text-side projections) and saving with the SD3 adapter.
    """

    sampler_name = "FlowMatchEulerDiscreteScheduler"
    pipeline_class_name = PIPELINE_CLASS
    denoiser_name = "transformer"
    network_class_name = "FluxTransformer2DModel"
    config_files = CONFIG_FILES
    family = "flux"
    sampler_defaults = (28, 3.5)  # the FLUX pipeline's defaults (distilled guidance; no negative prompt)
    timestep_density = "uniform"

    def __init__(self, transformer: nn.Module, vae: nn.Module, text_encoder: nn.Module, text_encoder_2: nn.Module,
                 tokenizer: Any, tokenizer_2: Any, scheduler: Any, device: torch.device | str | None = None,
                 frozen_dtype: torch.dtype | str | None = None, source: str | None = None,
                 folder: Path | None = None, max_sequence_length: int = 512,
                 denoiser_dtype: torch.dtype | str | None = None) -> None:
        super().__init__(transformer, vae, [text_encoder, text_encoder_2], [tokenizer, tokenizer_2], scheduler,
                         device=device, frozen_dtype=frozen_dtype, source=source, folder=folder,
                         max_sequence_length=max_sequence_length, denoiser_dtype=denoiser_dtype)
        self.text_encoder_2, self.tokenizer_2 = self.text_encoders[1], tokenizer_2

    # ---- loading and saving -------------------------------------------------------------------
    @classmethod
    def from_pipeline(cls, pipe: Any, device: torch.device | str | None = None,
                      frozen_dtype: torch.dtype | str | None = None, source: str | None = None,
                      folder: Path | None = None, denoiser_dtype: torch.dtype | str | None = None) -> FluxAdapter:
        """Wrap the components of an in-memory ``FluxPipeline`` (shared, not copied)."""
        return cls(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer,
                   pipe.tokenizer_2, pipe.scheduler, device=device, frozen_dtype=frozen_dtype, source=source,
                   folder=folder, denoiser_dtype=denoiser_dtype)

    @classmethod
    def load_pipeline(cls, load_from: str, folder: Path, local_only: bool, **components: Any) -> Any:
        from diffusers import FluxPipeline

        absent = absent_components(folder) if (folder / "model_index.json").is_file() else {}
        return FluxPipeline.from_pretrained(load_from, use_safetensors=True, local_files_only=local_only,
                                            **{**absent, **components})

    def _pipeline(self, unet: nn.Module | None = None, scheduler: Any = None, with_text: bool = True) -> Any:
        """A ``FluxPipeline`` over this adapter's components (shared objects, no copies)."""
        from diffusers import FluxPipeline

        return FluxPipeline(transformer=unet if unet is not None else self.unet,
                            scheduler=scheduler if scheduler is not None else self.scheduler, vae=self.vae,
                            text_encoder=self.text_encoder if with_text else None,
                            tokenizer=self.tokenizer if with_text else None,
                            text_encoder_2=self.text_encoder_2 if with_text else None,
                            tokenizer_2=self.tokenizer_2 if with_text else None)

    def identity_configs(self) -> dict[str, dict]:
        configs = {"transformer": dict(self.unet.config), "vae": dict(self.vae.config),
                   "scheduler": dict(self.scheduler.config), "text_encoder": self.text_encoder.config.to_dict(),
                   "text_encoder_2": self.text_encoder_2.config.to_dict()}
        configs.update({"tokenizer_vocab": self.tokenizer.get_vocab(),
                        "tokenizer_2_vocab": self.tokenizer_2.get_vocab()})
        return configs

    def model_identity(self) -> dict[str, Any]:
        return {key: value for key, value in super().model_identity().items() if key != "t5"}

    @property
    def resolution(self) -> int:
        """The native image side in pixels: the VAE's sample size (the transformer has none)."""
        return int(self.vae.config.sample_size)

    # ---- the network --------------------------------------------------------------------------
    def predict_noise(self, x_t: torch.Tensor, timesteps: torch.Tensor, condition: FluxCondition) -> torch.Tensor:
        """The transformer's velocity for unpacked latents ``x_t`` ``(N, C, H, W)``: packed into 2×2
        patches with their position ids, σ = t / 1000 as the timestep, the training guidance for a
        guidance-distilled model; the output is unpacked to ``x_t``'s shape."""
        from diffusers import FluxPipeline

        n, c, h, w = x_t.shape
        dtype = self.unet.dtype
        packed = FluxPipeline._pack_latents(x_t.to(self.device, dtype), n, c, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, self.device, dtype)
        states = condition.states.to(self.device, dtype)
        text_ids = torch.zeros(states.shape[1], 3, device=self.device, dtype=dtype)
        guidance = None
        if self.unet.config.guidance_embeds:
            guidance = torch.full((n,), TRAIN_GUIDANCE, device=self.device, dtype=torch.float32)
        out = self.unet(hidden_states=packed, timestep=(timesteps.to(self.device, torch.float32) / 1000).to(dtype),
                        guidance=guidance, pooled_projections=condition.pooled.to(self.device, dtype),
                        encoder_hidden_states=states, txt_ids=text_ids, img_ids=image_ids).sample
        return FluxPipeline._unpack_latents(out, h * self.vae_scale_factor, w * self.vae_scale_factor,
                                            self.vae_scale_factor)

    # ---- the protocol -------------------------------------------------------------------------
    @torch.no_grad()
    @uses_text_encoders
    def encode_prompts(self, prompts: Sequence[str], batch_size: int = 64) -> FluxCondition:
        """The pipeline's own prompt encoding (T5 states, pooled CLIP), float32 on the CPU."""
        return self._encode_pooled(prompts, batch_size)

    def _encode_part(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, pool, _ = self._pipeline().encode_prompt(prompts, None, device=self.device,
                                                         max_sequence_length=self.max_sequence_length)
        return embeds, pool

    @torch.no_grad()
    def sample_condition(self, condition: FluxCondition, seeds: Sequence[int], steps: int = 28,
                         guidance: float = 3.5, batch_size: int = 8, progress: bool = False,
                         height: int | None = None, width: int | None = None) -> torch.Tensor:
        """:meth:`sample` from already encoded (or attacked) prompts with the pipeline's own loop
        (dynamic shift, distilled guidance ``guidance``, no negative prompt)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        dtype = self.unet.dtype

        def inputs(cond: FluxCondition) -> dict:
            return {"prompt_embeds": cond.states.to(self.device, dtype),
                    "pooled_prompt_embeds": cond.pooled.to(self.device, dtype)}

        def decode(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
            return self.decode_latents(FluxPipeline._unpack_latents(packed, h, w, self.vae_scale_factor))

        return self.pipeline_samples(condition, seeds, steps, guidance, batch_size, progress, height, width,
                                     FlowMatchEulerDiscreteScheduler, inputs, decode)

    def make_condition(self, states: torch.Tensor, pooled: torch.Tensor) -> FluxCondition:
        """Inverse of :meth:`condition_tensors`."""
        return FluxCondition(states, pooled)

    def _suffix_encoder(self):
        # T5's vocabulary: T5 gives every token state; CLIP only the pooled vector, and reads the suffix as text.
        return self.tokenizer_2, self.text_encoder_2, int(self.max_sequence_length)


__all__ = ["PIPELINE_CLASS", "FluxAdapter", "FluxCondition", "TRAIN_GUIDANCE"]
