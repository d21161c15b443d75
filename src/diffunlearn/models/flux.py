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

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .pixel_base import sampling
from .sd import absent_components, parse_dtype
from .sd3 import SD3Condition, StableDiffusion3Adapter
from .selection import LoraSettings, has_lora

PIPELINE_CLASS = "FluxPipeline"
CONFIG_FILES = ("model_index.json", "transformer/config.json", "vae/config.json", "text_encoder/config.json",
                "text_encoder_2/config.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json",
                "tokenizer_2/tokenizer_config.json")
TRAIN_GUIDANCE = 3.5  # the guidance embedding during training (diffusers' FLUX scripts' default)


class FluxCondition(SD3Condition):
    """Encoded prompts: T5 token states ``(N, L, D)`` and pooled CLIP ``(N, P)``."""

    def __getitem__(self, index) -> FluxCondition:
        return FluxCondition(self.states[index], self.pooled[index])

    def to(self, device: torch.device | str) -> FluxCondition:
        return FluxCondition(self.states.to(device), self.pooled.to(device))

    @staticmethod
    def cat(parts: Sequence[SD3Condition]) -> FluxCondition:
        return FluxCondition(torch.cat([p.states for p in parts]), torch.cat([p.pooled for p in parts]))


class FluxAdapter(StableDiffusion3Adapter):
    """Adapter for diffusers ``FluxPipeline`` models (FLUX.1 dev and schnell, and their fine-tunes).

    Shares the rectified-flow terms, the latent encoding, LoRA, the parameter selections
    (cross-attention = the double-stream blocks' text-side projections) and saving with the SD3 adapter.
    """

    sampler_name = "FlowMatchEulerDiscreteScheduler"
    pipeline_class_name = PIPELINE_CLASS
    denoiser_name = "transformer"
    family = "flux"
    sampler_defaults = (28, 3.5)  # the FLUX pipeline's defaults (distilled guidance; no negative prompt)
    timestep_density = "uniform"

    def __init__(self, transformer: nn.Module, vae: nn.Module, text_encoder: nn.Module, text_encoder_2: nn.Module,
                 tokenizer: Any, tokenizer_2: Any, scheduler: Any, device: torch.device | str | None = None,
                 frozen_dtype: torch.dtype | str | None = None, source: str | None = None,
                 folder: Path | None = None, max_sequence_length: int = 512) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.frozen_dtype = parse_dtype(frozen_dtype)
        self.unet = nn.Module.to(transformer, device=self.device, dtype=torch.float32)
        self.vae = nn.Module.to(vae, device=self.device, dtype=self.frozen_dtype or torch.float32)
        self.text_encoders = [nn.Module.to(e, device=self.device, dtype=self.frozen_dtype or torch.float32)
                              for e in (text_encoder, text_encoder_2)]
        for frozen in (self.vae, *self.text_encoders):
            frozen.eval().requires_grad_(False)
        self.text_encoder, self.text_encoder_2 = self.text_encoders
        self.tokenizers = [tokenizer, tokenizer_2]
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.scheduler = scheduler
        self.train_scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        self.num_train_timesteps = int(self.train_scheduler.config.num_train_timesteps)
        self.train_timesteps = self.train_scheduler.timesteps.clone().float().cpu()
        self.prediction_type = "flow"
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.max_sequence_length = max_sequence_length
        self.source = source
        self.folder = folder
        self.lora_settings = LoraSettings()

    # ---- loading and saving -------------------------------------------------------------------
    @classmethod
    def from_pipeline(cls, pipe: Any, device: torch.device | str | None = None,
                      frozen_dtype: torch.dtype | str | None = None, source: str | None = None,
                      folder: Path | None = None) -> FluxAdapter:
        """Wrap the components of an in-memory ``FluxPipeline`` (shared, not copied)."""
        return cls(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer,
                   pipe.tokenizer_2, pipe.scheduler, device=device, frozen_dtype=frozen_dtype, source=source,
                   folder=folder)

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

    def save_lora(self, folder: str | os.PathLike) -> None:
        """Write the transformer's LoRA adapters in diffusers' format, so that
        ``FluxPipeline.from_pretrained(base).load_lora_weights(folder)`` reproduces this model.

        Raises:
            UserError: no LoRA adapters (train with selection ``lora`` first).
        """
        if not has_lora(self.unet):
            raise UserError("this model has no LoRA weights to save: train with parameter selection `lora`, or "
                            "save the full pipeline or the transformer instead")
        from diffusers import FluxPipeline
        from peft.utils import get_peft_model_state_dict

        FluxPipeline.save_lora_weights(
            folder, transformer_lora_layers=get_peft_model_state_dict(self.unet), safe_serialization=True,
            transformer_lora_adapter_metadata=self.unet.peft_config["default"].to_dict())

    def load_unet(self, folder: str | os.PathLike) -> None:
        """Replace the transformer by a saved ``FluxTransformer2DModel`` folder (``save: unet``).

        Raises:
            UserError: the folder holds no loadable transformer.
        """
        from diffusers import FluxTransformer2DModel

        try:
            transformer = FluxTransformer2DModel.from_pretrained(str(folder), use_safetensors=True)
        except Exception as exc:  # missing or corrupt files
            raise UserError(f"could not load a FLUX transformer from {folder} ({exc}); pass a folder written with "
                            "`save: unet`") from exc
        self.unet = nn.Module.to(transformer, device=self.device, dtype=torch.float32).eval()

    def model_identity(self) -> dict[str, Any]:
        """What a manifest records about the model: configs only (no weight hashing)."""
        digest = hashlib.sha256()
        if self.folder is not None:
            for name in CONFIG_FILES:
                path = Path(self.folder) / name
                if path.is_file():
                    digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
        else:
            configs = {"transformer": dict(self.unet.config), "vae": dict(self.vae.config),
                       "scheduler": dict(self.scheduler.config), "text_encoder": self.text_encoder.config.to_dict(),
                       "text_encoder_2": self.text_encoder_2.config.to_dict()}
            configs = {part: {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
                       for part, config in configs.items()}
            configs["tokenizers"] = [self.tokenizer.get_vocab(), self.tokenizer_2.get_vocab()]
            digest.update(json.dumps(configs, sort_keys=True, default=str).encode())
        lora = None
        if has_lora(self.unet):
            config = self.unet.peft_config["default"]
            lora = {"rank": config.r, "alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)}
        return {"class": PIPELINE_CLASS, "source": self.source, "revision": None, "config_sha256": digest.hexdigest(),
                "prediction_type": self.prediction_type, "lora": lora}

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
    def encode_prompts(self, prompts: Sequence[str], batch_size: int = 64) -> FluxCondition:
        """The pipeline's own prompt encoding (T5 states, pooled CLIP), float32 on the CPU."""
        pipe = self._pipeline()
        prompts = list(prompts)
        states, pooled = [], []
        for start in range(0, len(prompts), batch_size):
            embeds, pool, _ = pipe.encode_prompt(prompts[start:start + batch_size], None, device=self.device,
                                                 max_sequence_length=self.max_sequence_length)
            states.append(embeds.float().cpu())
            pooled.append(pool.float().cpu())
        if not states:
            raise ValueError("no prompts to encode")
        return FluxCondition(torch.cat(states), torch.cat(pooled))

    @torch.no_grad()
    def sample_condition(self, condition: FluxCondition, seeds: Sequence[int], steps: int = 28,
                         guidance: float = 3.5, batch_size: int = 8, progress: bool = False,
                         height: int | None = None, width: int | None = None) -> torch.Tensor:
        """:meth:`sample` from already encoded (or attacked) prompts with the pipeline's own loop
        (dynamic shift, distilled guidance ``guidance``, no negative prompt)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        if len(seeds) != len(condition):
            raise ValueError(f"need one seed per condition row, got {len(seeds)} seeds for {len(condition)} rows")
        if steps < 1 or batch_size < 1:
            raise ValueError(f"`steps` and `batch_size` must be positive, got {steps} and {batch_size}")
        height, width = height or self.resolution, width or self.resolution
        pipe = self._pipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config),
                              with_text=False)
        pipe.set_progress_bar_config(disable=True)
        dtype = self.unet.dtype
        out = []
        with sampling(self.unet, len(seeds), progress) as bar:
            for start in range(0, len(seeds), batch_size):
                cond = condition[start:start + batch_size]
                generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start:start + batch_size]]
                packed = pipe(prompt_embeds=cond.states.to(self.device, dtype),
                              pooled_prompt_embeds=cond.pooled.to(self.device, dtype), num_inference_steps=steps,
                              guidance_scale=guidance, height=height, width=width, generator=generators,
                              output_type="latent").images
                latents = FluxPipeline._unpack_latents(packed, height, width, self.vae_scale_factor)
                out.append(self.decode_latents(latents).float().clamp(-1, 1).cpu())
                bar.update(len(cond))
        return torch.cat(out)

    def make_condition(self, states: torch.Tensor, pooled: torch.Tensor) -> FluxCondition:
        """Inverse of :meth:`condition_tensors`."""
        return FluxCondition(states, pooled)

    def text_tokens(self):
        raise UserError("the prompt (token) attacks need a single text encoder; FLUX has CLIP and T5, so use the "
                        "embedding attack for it")

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        raise UserError("the prompt (token) attacks need a single text encoder; use the embedding attack for FLUX")


__all__ = ["PIPELINE_CLASS", "FluxAdapter", "FluxCondition", "TRAIN_GUIDANCE"]
