"""Stable Diffusion XL behind the adapter protocol (issue 15): the SD UNet objective (ε- or
v-prediction on DDPM timesteps) with SDXL's conditions.

The adapter holds a diffusers ``StableDiffusionXLPipeline``'s components: the UNet (trained), the VAE,
the two CLIP text encoders (CLIP-L, and OpenCLIP bigG with projection) and their tokenizers (frozen).
A condition is what the pipeline feeds the UNet: the two encoders' penultimate token states side by
side, the second encoder's pooled projection, and the size/crop "time ids" (original size, crop
top-left, target size: the image's own size and no crop, as the pipeline uses by default). The
refiner is out of scope.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .sd import StableDiffusionAdapter, absent_components, uses_text_encoders

PIPELINE_CLASS = "StableDiffusionXLPipeline"
CONFIG_FILES = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                "text_encoder_2/config.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json",
                "tokenizer_2/vocab.json")


class SDXLCondition:
    """Encoded prompts: token states ``(N, 77, D1 + D2)``, pooled projections ``(N, P)`` and the size/crop
    time ids ``(N, 6)``."""

    def __init__(self, states: torch.Tensor, pooled: torch.Tensor, time_ids: torch.Tensor) -> None:
        self.states = states
        self.pooled = pooled
        self.time_ids = time_ids

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, index) -> SDXLCondition:
        return SDXLCondition(self.states[index], self.pooled[index], self.time_ids[index])

    def to(self, device: torch.device | str) -> SDXLCondition:
        return SDXLCondition(self.states.to(device), self.pooled.to(device), self.time_ids.to(device))

    @staticmethod
    def cat(parts: Sequence[SDXLCondition]) -> SDXLCondition:
        return SDXLCondition(torch.cat([p.states for p in parts]), torch.cat([p.pooled for p in parts]),
                             torch.cat([p.time_ids for p in parts]))


class StableDiffusionXLAdapter(StableDiffusionAdapter):
    """Adapter for diffusers ``StableDiffusionXLPipeline`` models (SDXL base 1.0 and fine-tunes).

    Everything but the conditions is the SD 1.x/2.x adapter's: the DDPM objective, LoRA, the parameter
    selections (cross-attention = ``attn2``), saving, the Hub snapshot.
    """

    pipeline_class_name = PIPELINE_CLASS
    config_files = CONFIG_FILES
    family = "sdxl"
    sampler_defaults = (50, 5.0)  # the SDXL pipeline's defaults

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, text_encoder_2: nn.Module,
                 tokenizer: Any, tokenizer_2: Any, scheduler: Any, force_zeros_for_empty_prompt: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(unet, vae, text_encoder, tokenizer, scheduler, **kwargs)
        self.text_encoder_2 = nn.Module.to(text_encoder_2, device=self.device,  # frozen, as the first encoder
                                           dtype=self.frozen_dtype or torch.float32).eval().requires_grad_(False)
        self.tokenizer_2 = tokenizer_2
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    # ---- loading and saving -------------------------------------------------------------------
    @classmethod
    def from_pipeline(cls, pipe: Any, device: torch.device | str | None = None,
                      frozen_dtype: torch.dtype | str | None = None, source: str | None = None,
                      folder: Path | None = None,
                      denoiser_dtype: torch.dtype | str | None = None) -> StableDiffusionXLAdapter:
        """Wrap the components of an in-memory ``StableDiffusionXLPipeline`` (shared, not copied)."""
        return cls(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2,
                   pipe.scheduler, force_zeros_for_empty_prompt=bool(pipe.config.force_zeros_for_empty_prompt),
                   device=device, frozen_dtype=frozen_dtype, source=source, folder=folder,
                   denoiser_dtype=denoiser_dtype)

    @classmethod
    def load_pipeline(cls, load_from: str, folder: Path, local_only: bool, **components: Any) -> Any:
        from diffusers import StableDiffusionXLPipeline

        absent = absent_components(folder) if (folder / "model_index.json").is_file() else {}
        return StableDiffusionXLPipeline.from_pretrained(load_from, use_safetensors=True, local_files_only=local_only,
                                                         add_watermarker=False, **{**absent, **components})

    def _pipeline(self, unet: nn.Module | None = None, scheduler: Any = None, with_text: bool = True) -> Any:
        """A ``StableDiffusionXLPipeline`` over this adapter's components (shared objects, no copies)."""
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=self.vae, text_encoder=self.text_encoder if with_text else None,
            text_encoder_2=self.text_encoder_2 if with_text else None,
            tokenizer=self.tokenizer if with_text else None, tokenizer_2=self.tokenizer_2 if with_text else None,
            unet=unet if unet is not None else self.unet,
            scheduler=scheduler if scheduler is not None else self.scheduler,
            force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt, add_watermarker=False)

    def identity_configs(self) -> dict[str, dict]:
        return {**super().identity_configs(), "text_encoder_2": self.text_encoder_2.config.to_dict(),
                "tokenizer_2_vocab": self.tokenizer_2.get_vocab()}

    # ---- the conditions -------------------------------------------------------------------------
    def time_ids(self, n: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """``n`` rows of (original H, W, crop top, left, target H, W): the image's own size, no crop."""
        h, w = height or self.resolution, width or self.resolution
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).expand(n, -1).clone()

    @torch.no_grad()
    @uses_text_encoders
    def encode_prompts(self, prompts: Sequence[str], batch_size: int = 64) -> SDXLCondition:
        """The pipeline's own prompt encoding (no classifier-free copy), float32 on the CPU."""
        return self._encode_pooled(prompts, batch_size)

    def _encode_part(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pool, _ = self._pipeline().encode_prompt(prompts, device=self.device,
                                                            do_classifier_free_guidance=False)
        return embeds, pool

    @torch.no_grad()
    @uses_text_encoders
    def negative_condition(self, n: int) -> SDXLCondition:
        """The pipeline's unconditional input for ``n`` rows: zeros when the model is configured so
        (``force_zeros_for_empty_prompt``, SDXL base), else the encoding of ""."""
        pipe = self._pipeline()
        _, negative, _, negative_pooled = pipe.encode_prompt([""], device=self.device, do_classifier_free_guidance=True)
        return SDXLCondition(negative.float().cpu().expand(n, -1, -1), negative_pooled.float().cpu().expand(n, -1),
                             self.time_ids(n))

    def predict_noise(self, x_t: torch.Tensor, timesteps: torch.Tensor, condition: SDXLCondition) -> torch.Tensor:
        """The UNet's output for ``x_t`` with SDXL's added conditions (on ``self.device``)."""
        dtype = self.unet.dtype
        added = {"text_embeds": condition.pooled.to(self.device, dtype),
                 "time_ids": condition.time_ids.to(self.device, dtype)}
        return self.unet(x_t.to(self.device, dtype), timesteps.to(self.device),
                         encoder_hidden_states=condition.states.to(self.device, dtype), added_cond_kwargs=added).sample

    @torch.no_grad()
    def sample_condition(self, condition: SDXLCondition, seeds: Sequence[int], steps: int = 50,
                         guidance: float = 5.0, batch_size: int = 8, progress: bool = False,
                         height: int | None = None, width: int | None = None) -> torch.Tensor:
        """:meth:`sample` from already encoded (or attacked) prompts, one image per row and seed."""
        from diffusers import DPMSolverMultistepScheduler

        return self.pipeline_samples(condition, seeds, steps, guidance, batch_size, progress, height, width,
                                     DPMSolverMultistepScheduler, self.pooled_inputs(self.negative_condition(1)),
                                     self.decode_latents)

    def condition_tensors(self, condition: SDXLCondition) -> tuple[torch.Tensor, ...]:
        """The continuous parts an attack may optimise: token states and pooled projection (the
        size/crop ids are not text and stay as they are)."""
        return (condition.states, condition.pooled)

    def make_condition(self, states: torch.Tensor, pooled: torch.Tensor) -> SDXLCondition:
        """Inverse of :meth:`condition_tensors` (with the default size/crop ids)."""
        return SDXLCondition(states, pooled, self.time_ids(len(states)).to(states.device))

    # The prompt attack's suffix is searched in OpenCLIP-G's vocabulary (its states are 1280 of the
    # 2048 and it alone gives the pooled projection); CLIP-L, same vocabulary, reads the same words.
    several_text_encoders = True

    def _suffix_encoder(self):
        return self.tokenizer_2, self.text_encoder_2, int(self.tokenizer_2.model_max_length)

    def text_tokens(self):
        raise UserError("SDXL has two text encoders, so it has no single token path; the prompt attack uses "
                        "suffix_encoder() and encode_prompts_with_grad()")

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        raise UserError("SDXL has two text encoders; encode prompts with encode_prompts_with_grad()")


__all__ = ["PIPELINE_CLASS", "SDXLCondition", "StableDiffusionXLAdapter"]
