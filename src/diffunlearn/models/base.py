"""The adapter protocol: the one narrow interface through which methods and evaluators see a model.

Methods, losses, the training loop and evaluators never touch ``unet`` or ``scheduler`` attributes
directly; they call these methods. A Stable Diffusion adapter (latent space, CLIP text encoder) and
the digit world's pixel-space adapter implement the same protocol (k-diffusion's ``external.py``
idea: wrap outside models behind one interface).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

# Parameter selections every adapter understands (see models/selection.py): all UNet weights, the
# cross-attention blocks only, everything but cross-attention, or LoRA adapters on the attention.
SELECTIONS = ("full", "cross-attention", "non-cross-attention", "lora")


class Condition(Protocol):
    """Whatever a model is conditioned on; opaque to methods (indexable by a batch of rows)."""


@runtime_checkable
class DiffusionAdapter(Protocol):
    """What an unlearning method needs from a text-to-image diffusion model."""

    num_train_timesteps: int

    def encode_prompts(self, prompts: Sequence[str]) -> Condition:
        """Encode prompts into the model's condition (frozen encoder, no gradient)."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Map images ``(N, 3, H, W)`` in [-1, 1] to the space the UNet denoises (latents or pixels)."""

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward diffusion q(x_t | x_0)."""

    def predict_noise(self, x_t: torch.Tensor, timesteps: torch.Tensor, condition: Condition) -> torch.Tensor:
        """The trainable network's output, same shape as ``x_t``: ε for ε-prediction models; an adapter
        whose model predicts something else (v-prediction) also has ``prediction_target(x0, noise, t)``
        giving the matching training target."""

    def trainable_parameters(self, selection: str) -> list[tuple[str, nn.Parameter]]:
        """Select parameters to train by name (one of ``SELECTIONS``); the rest are frozen.

        Returns exactly the ``(name, parameter)`` pairs left with ``requires_grad=True``.
        """

    def sample(self, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float,
               batch_size: int, progress: bool) -> torch.Tensor:
        """Generate one image per prompt and seed, ``(N, 3, H, W)`` in [-1, 1]."""

    def save(self, folder: str | os.PathLike) -> None:
        """Write the model in its native (diffusers) folder layout."""

    # ---- what the red-team attacks need (diffunlearn.attacks) ---------------------------------------
    def sample_condition(self, condition: Condition, seeds: Sequence[int], steps: int, guidance: float,
                         batch_size: int, progress: bool) -> torch.Tensor:
        """``sample`` from an already encoded (possibly attacked) condition, one image per row and seed."""

    def condition_tensors(self, condition: Condition) -> tuple[torch.Tensor, ...]:
        """The condition as tensors: first the continuous part an attack may optimise (token states,
        class-embedding vectors), then whatever else it carries (an attention mask)."""

    def make_condition(self, *tensors: torch.Tensor) -> Condition:
        """Inverse of ``condition_tensors``."""


@runtime_checkable
class TextTokenAdapter(Protocol):
    """What a text-conditioned adapter adds for attacks on token embeddings (the ``prompt`` attack)."""

    def text_tokens(self) -> tuple[object, nn.Module, int]:
        """``(tokenizer, frozen text encoder, token length)``; the encoder's ``get_input_embeddings()``
        is the table an attack reads and hooks."""

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Condition:
        """Token ids ``(N, L)`` -> condition, with gradient flowing through the (frozen) encoder."""
