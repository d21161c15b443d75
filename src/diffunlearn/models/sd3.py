"""Stable Diffusion 3 / 3.5 (MMDiT, rectified flow) behind the adapter protocol (issue 15).

The adapter holds a diffusers ``StableDiffusion3Pipeline``'s components: the ``SD3Transformer2DModel``
(kept as ``self.unet``, the name every layer uses for the trained network), the VAE, the two CLIP
text encoders with projection (CLIP-L, CLIP-G) and the optional T5 encoder (``text_encoder_3``;
a pipeline saved without it, as diffusers allows to save memory, conditions on zeros in its place),
and the ``FlowMatchEulerDiscreteScheduler``. Only the transformer trains.

The training objective is the flow-matching one of diffusers' SD3 training scripts
(``train_dreambooth_sd3.py``):

* σ from the logit-normal density: u = sigmoid(N(m, s)) (m = 0, s = 1), index ⌊u·T⌋ into the
  scheduler's shifted timesteps (``shift`` of its config, 3.0 for SD3), σ = t / T;
* x_t = (1 − σ)·x₀ + σ·ε, target ε − x₀ (the velocity), weight 1 (the scripts' default
  ``logit_normal`` weighting scheme weighs every sample equally).

diffusers' ``compute_density_for_timestep_sampling`` draws u from the GLOBAL generator; the loop needs
the run's own generator (bit-identical resume, one stream for noise and timesteps), so the two lines
are written here with it.

Latents are ``(vae.encode(x).latent_dist.mean − shift_factor) · scaling_factor``, as the pipeline
decodes them. Prompts are encoded by the pipeline's own ``encode_prompt`` (CLIP-L and CLIP-G token
states side by side, padded to the joint attention width, then the T5 states or zeros; the pooled
CLIP projections concatenated).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .sd import StableDiffusionAdapter, absent_components, uses_text_encoders

PIPELINE_CLASS = "StableDiffusion3Pipeline"
# MMDiT's joint attention: the text-side ("context") projections are the analogue of a UNet's
# cross-attention (the text enters the image through them), the image-side ones of self-attention.
CONTEXT_PROJECTIONS = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
CONFIG_FILES = ("model_index.json", "transformer/config.json", "vae/config.json", "text_encoder/config.json",
                "text_encoder_2/config.json", "text_encoder_3/config.json", "scheduler/scheduler_config.json",
                "tokenizer/vocab.json", "tokenizer_2/vocab.json")
TEXT_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3")
TOKENIZER_PARTS = ("tokenizer", "tokenizer_2", "tokenizer_3")


class SD3Condition:
    """Encoded prompts: token states ``(N, L, D)`` and pooled projections ``(N, P)``."""

    def __init__(self, states: torch.Tensor, pooled: torch.Tensor) -> None:
        self.states = states
        self.pooled = pooled

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, index) -> SD3Condition:
        return type(self)(self.states[index], self.pooled[index])

    def to(self, device: torch.device | str) -> SD3Condition:
        return type(self)(self.states.to(device), self.pooled.to(device))

    @staticmethod
    def cat(parts: Sequence[SD3Condition]) -> SD3Condition:
        return type(parts[0])(torch.cat([p.states for p in parts]), torch.cat([p.pooled for p in parts]))


class StableDiffusion3Adapter(StableDiffusionAdapter):
    """Adapter for diffusers ``StableDiffusion3Pipeline`` models (SD3 medium, SD3.5 medium/large).

    Shares with the SD 1.x/2.x adapter what does not depend on the network: LoRA settings and
    injection, the parameter selections, saving the pipeline, the Hub snapshot, gradient checkpointing.
    """

    sampler_name = "FlowMatchEulerDiscreteScheduler"
    pipeline_class_name = PIPELINE_CLASS
    denoiser_name = "transformer"
    network_class_name = "SD3Transformer2DModel"
    config_files = CONFIG_FILES
    family = "sd3"
    condition_kind = "text"
    save_formats = ("pipeline", "unet", "lora")  # "unet" writes the transformer folder
    sample_batch_default = None
    sampler_defaults = (28, 7.0)  # the SD3 pipeline's defaults
    timestep_density = "logit_normal"  # or "uniform" (FLUX's scripts)
    logit_mean = 0.0
    logit_std = 1.0

    def __init__(self, transformer: nn.Module, vae: nn.Module, text_encoders: Sequence[nn.Module | None],
                 tokenizers: Sequence[Any], scheduler: Any, device: torch.device | str | None = None,
                 frozen_dtype: torch.dtype | str | None = None, source: str | None = None,
                 folder: Path | None = None, max_sequence_length: int = 256,
                 denoiser_dtype: torch.dtype | str | None = None) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.text_encoders = self._place(transformer, vae, text_encoders, device, frozen_dtype, denoiser_dtype)
        self.text_encoder = self.text_encoders[0]  # what callers that name one encoder get (CLIP-L)
        self.tokenizers = list(tokenizers)
        self.tokenizer = self.tokenizers[0]
        self.scheduler = scheduler
        self.train_scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        self.num_train_timesteps = int(self.train_scheduler.config.num_train_timesteps)
        # The scheduler's training timesteps with its shift applied (σ·T, from T down to about 1).
        self.train_timesteps = self.train_scheduler.timesteps.clone().float().cpu()
        self.prediction_type = "flow"
        self.max_sequence_length = max_sequence_length
        self._finish_init(source, folder)

    # ---- loading and saving -------------------------------------------------------------------
    @classmethod
    def from_pipeline(cls, pipe: Any, device: torch.device | str | None = None,
                      frozen_dtype: torch.dtype | str | None = None, source: str | None = None,
                      folder: Path | None = None,
                      denoiser_dtype: torch.dtype | str | None = None) -> StableDiffusion3Adapter:
        """Wrap the components of an in-memory ``StableDiffusion3Pipeline`` (shared, not copied)."""
        return cls(pipe.transformer, pipe.vae, [getattr(pipe, n, None) for n in TEXT_PARTS],
                   [getattr(pipe, n, None) for n in TOKENIZER_PARTS], pipe.scheduler, device=device,
                   frozen_dtype=frozen_dtype, source=source, folder=folder, denoiser_dtype=denoiser_dtype)

    @classmethod
    def load_pipeline(cls, load_from: str, folder: Path, local_only: bool, **components: Any) -> Any:
        from diffusers import StableDiffusion3Pipeline

        absent = absent_components(folder) if (folder / "model_index.json").is_file() else {}
        return StableDiffusion3Pipeline.from_pretrained(load_from, use_safetensors=True, local_files_only=local_only,
                                                        **{**absent, **components})

    def _pipeline(self, unet: nn.Module | None = None, scheduler: Any = None, with_text: bool = True) -> Any:
        """A ``StableDiffusion3Pipeline`` over this adapter's components (shared objects, no copies)."""
        from diffusers import StableDiffusion3Pipeline

        parts = {n: (e if with_text else None) for n, e in zip(TEXT_PARTS, self.text_encoders)}
        parts.update({n: (t if with_text else None) for n, t in zip(TOKENIZER_PARTS, self.tokenizers)})
        return StableDiffusion3Pipeline(transformer=unet if unet is not None else self.unet,
                                        scheduler=scheduler if scheduler is not None else self.scheduler,
                                        vae=self.vae, **parts)

    def identity_configs(self) -> dict[str, dict]:
        configs = {"transformer": dict(self.unet.config), "vae": dict(self.vae.config),
                   "scheduler": dict(self.scheduler.config)}
        configs.update({n: e.config.to_dict() for n, e in zip(TEXT_PARTS, self.text_encoders) if e is not None})
        configs.update({f"{n}_vocab": t.get_vocab() for n, t in zip(TOKENIZER_PARTS, self.tokenizers) if t is not None})
        return configs

    def model_identity(self) -> dict[str, Any]:
        t5 = len(self.text_encoders) > 2 and self.text_encoders[2] is not None  # SD3 may be saved without T5
        return {**super().model_identity(), "t5": t5}

    @staticmethod
    def is_cross_attention(name: str) -> bool:
        """Whether a transformer parameter is one of the text-side (context) attention projections."""
        return ".attn." in name and any(f".{p}." in name for p in CONTEXT_PROJECTIONS)

    # ---- the objective --------------------------------------------------------------------------
    def draw_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` training timesteps σ·T, σ from the family's density through the scheduler's timesteps
        (SD3: logit-normal, see the module docstring)."""
        if self.timestep_density == "uniform":
            u = torch.rand(n, generator=generator)
        else:
            u = torch.sigmoid(torch.randn(n, generator=generator) * self.logit_std + self.logit_mean)
        index = (u * self.num_train_timesteps).long().clamp(max=len(self.train_timesteps) - 1)
        return self.train_timesteps[index]

    def sigmas(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """σ = t / T, shaped to broadcast against ``like``."""
        sigma = timesteps.to(like.device, torch.float32) / self.num_train_timesteps
        return sigma.view(-1, *([1] * (like.ndim - 1)))

    def training_terms(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(x_t, target, weight)`` = ((1 − σ)·x₀ + σ·ε, ε − x₀, None): rectified flow."""
        sigma = self.sigmas(timesteps, x0)
        return (1.0 - sigma) * x0 + sigma * noise, noise - x0, None

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.training_terms(x0, noise, timesteps)[0]

    def prediction_target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def predict_noise(self, x_t: torch.Tensor, timesteps: torch.Tensor, condition: SD3Condition) -> torch.Tensor:
        """The transformer's velocity prediction for ``x_t`` (on ``self.device``)."""
        dtype = self.unet.dtype
        return self.unet(hidden_states=x_t.to(self.device, dtype), timestep=timesteps.to(self.device),
                         encoder_hidden_states=condition.states.to(self.device, dtype),
                         pooled_projections=condition.pooled.to(self.device, dtype)).sample

    # ---- the protocol -------------------------------------------------------------------------
    @torch.no_grad()
    @uses_text_encoders
    def encode_prompts(self, prompts: Sequence[str], batch_size: int = 64) -> SD3Condition:
        """The pipeline's own prompt encoding (no classifier-free copy), float32 on the CPU."""
        return self._encode_pooled(prompts, batch_size)

    def _encode_part(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pool, _ = self._pipeline().encode_prompt(prompts, None, None, device=self.device,
                                                            do_classifier_free_guidance=False,
                                                            max_sequence_length=self.max_sequence_length)
        return embeds, pool

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Latents ``(mean − shift_factor) · scaling_factor`` of images ``(N, 3, H, W)`` in [-1, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        scale, shift = float(self.vae.config.scaling_factor), float(self.vae.config.shift_factor or 0.0)
        out = []
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(self.device, self.vae.dtype)
            out.append(((self.vae.encode(x).latent_dist.mean - shift) * scale).float().cpu())
        return torch.cat(out)

    def decode_latents(self, latents: torch.Tensor, height: int | None = None, width: int | None = None
                       ) -> torch.Tensor:
        scale, shift = float(self.vae.config.scaling_factor), float(self.vae.config.shift_factor or 0.0)
        return self.vae.decode((latents / scale + shift).to(self.vae.dtype)).sample

    @torch.no_grad()
    def sample_condition(self, condition: SD3Condition, seeds: Sequence[int], steps: int = 28,
                         guidance: float = 7.0, batch_size: int = 8, progress: bool = False,
                         height: int | None = None, width: int | None = None) -> torch.Tensor:
        """:meth:`sample` from already encoded (or attacked) prompts, one image per row and seed."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return self.pipeline_samples(condition, seeds, steps, guidance, batch_size, progress, height, width,
                                     FlowMatchEulerDiscreteScheduler, self.pooled_inputs(self.encode_prompts([""])),
                                     self.decode_latents)

    def condition_tensors(self, condition: SD3Condition) -> tuple[torch.Tensor, ...]:
        """The continuous parts of a condition an attack may optimise: token states and pooled projections."""
        return (condition.states, condition.pooled)

    def make_condition(self, states: torch.Tensor, pooled: torch.Tensor) -> SD3Condition:
        """Inverse of :meth:`condition_tensors`."""
        return SD3Condition(states, pooled)

    # The prompt attack's suffix is searched in CLIP-G's vocabulary (always present, the larger CLIP);
    # CLIP-L and T5, when the folder has it, read the same words as text.
    several_text_encoders = True

    def _suffix_encoder(self):
        return self.tokenizers[1], self.text_encoders[1], int(self.tokenizers[1].model_max_length)

    def text_tokens(self):
        raise UserError(f"{self.pipeline_class_name} has several text encoders, so it has no single token path; the "
                        "prompt attack uses suffix_encoder() and encode_prompts_with_grad()")

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        raise UserError(f"{self.pipeline_class_name} has several text encoders; encode prompts with "
                        "encode_prompts_with_grad()")


__all__ = ["PIPELINE_CLASS", "SD3Condition", "StableDiffusion3Adapter"]
