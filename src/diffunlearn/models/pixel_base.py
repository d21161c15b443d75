"""What the two pixel-space adapters share (the digit world's text-to-image model and the
class-conditional model): a diffusers UNet trained with DDPM's forward process on pixels, saved in
diffusers' folder layout (``model_index.json``, ``unet/``, ``scheduler/``), placed on one device.

The training objective lives here, with the model that defines it: ``draw_timesteps`` (uniform
integer timesteps), ``add_noise`` (x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε) and ``prediction_target`` (ε, v or
x₀ after the scheduler's ``prediction_type``), combined by ``DenoisingObjective.training_terms``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError

# Output kinds the training target and the samplers both understand.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")



@contextlib.contextmanager
def sampling(unet: nn.Module, total: int, progress: bool | str) -> Iterator:
    """Every adapter's sampling frame: ``unet`` in eval mode and a progress bar over ``total`` images
    (a string ``progress`` labels it: which model and set); the bar is closed and the unet's mode
    restored however the sampling ends."""
    from tqdm.auto import tqdm

    was_training = unet.training
    unet.eval()
    bar = tqdm(total=total, desc=progress if isinstance(progress, str) else "sampling", disable=not progress,
               leave=False)
    try:
        yield bar
    finally:
        bar.close()
        unet.train(was_training)


class DenoisingObjective:
    """The DDPM training objective of an adapter that has ``add_noise`` and ``prediction_target``
    (every model family diffunlearn supports today; a flow-matching family overrides these)."""

    num_train_timesteps: int

    def draw_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` training timesteps t ~ U{0..T−1} from ``generator`` (on the CPU)."""
        return torch.randint(self.num_train_timesteps, (n,), generator=generator)

    def training_terms(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(x_t, target, weight)``: the noised input, what the network should output there, and an
        optional per-sample loss weight (None = uniform)."""
        return self.add_noise(x0, noise, timesteps), self.prediction_target(x0, noise, timesteps), None

    def clone(self, frozen: bool = False):
        """A copy whose trainable network (``unet``) is its own; everything frozen (text encoder, VAE,
        caches) is shared. ``frozen``: in eval mode without gradients (ESD's and SalUn's reference)."""
        twin = copy.copy(self)
        twin.unet = copy.deepcopy(self.unet)
        if frozen:
            twin.unet.eval().requires_grad_(False)
        return twin


class PixelSpaceAdapter(DenoisingObjective):
    """Base of the pixel-space adapters: a UNet and its DDPM scheduler on one device.

    Every adapter declares what it is instead of callers probing its attributes: ``family`` (the
    kind ``config.model_kind`` reads from folders: ``pixel``, ``class`` or ``text``),
    ``condition_kind`` (``text`` or ``class``), ``save_formats`` (the first is the default),
    ``sample_batch_default`` (images per sampler call, None = the training batch size) and
    ``sampler_defaults`` ((steps, guidance) of an evaluation without a run config).
    """

    unet: nn.Module
    save_formats: tuple[str, ...]
    sample_batch_default: int | None = 256  # tiny models sample hundreds of images at once

    def __init__(self, unet: nn.Module, scheduler) -> None:
        prediction = scheduler.config.get("prediction_type", "epsilon")
        if prediction not in PREDICTION_TYPES:
            raise UserError(f"unsupported scheduler prediction_type {prediction!r}; "
                            f"use one of: {', '.join(PREDICTION_TYPES)}")
        self.unet = unet
        self.scheduler = scheduler
        self.prediction_type = prediction
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self._alphas_cumprod = scheduler.alphas_cumprod.float()

    # ---- placement ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the UNet lives; inputs are moved there."""
        return next(self.unet.parameters()).device

    def to(self, device: torch.device | str):
        """Move the UNet to ``device`` (in place; returns the adapter)."""
        self.unet.to(device)
        return self

    # ---- the objective --------------------------------------------------------------------------
    def _alpha(self, x0: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self._alphas_cumprod.to(x0.device)[timesteps.to(x0.device)].view(-1, 1, 1, 1)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward diffusion x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε with the training scheduler's ᾱ."""
        a = self._alpha(x0, timesteps)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def prediction_target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet should output: ε (epsilon models), v = √ᾱ_t ε − √(1−ᾱ_t) x₀
        (``v_prediction``) or x₀ (``sample``)."""
        if self.prediction_type == "v_prediction":
            a = self._alpha(x0, timesteps)
            return a.sqrt() * noise - (1 - a).sqrt() * x0
        if self.prediction_type == "sample":
            return x0
        return noise

    # ---- shared plumbing ------------------------------------------------------------------------
    @staticmethod
    def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
        """One starting image per seed, ``torch.Generator().manual_seed(seed)`` on the CPU: an image
        depends on its own seed only (not on batch size, neighbours or device)."""
        return torch.stack([torch.randn(*shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])

    @staticmethod
    def load_parts(folder: Path, unet_class, scheduler_class, what: str) -> tuple[nn.Module, object]:
        """``folder/unet`` (safetensors) and ``folder/scheduler`` with diffusers' ``from_pretrained``.

        Raises:
            UserError: the folder lacks them, or a file is truncated or corrupt.
        """
        if not (folder / "unet" / "config.json").is_file() or not (folder / "scheduler").is_dir():
            raise UserError(f"{folder} is not {what} (expected unet/ and scheduler/ inside); pass the folder written "
                            "by `diffunlearn world train-base` or an unlearning run, or a diffusers pipeline folder")
        try:
            unet = unet_class.from_pretrained(folder / "unet", use_safetensors=True)
            scheduler = scheduler_class.from_pretrained(folder / "scheduler")
        except Exception as exc:  # diffusers raises several types for truncated or bad files
            raise UserError(f"could not load the model in {folder} ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:160] if str(exc) else 'no message'}); "
                            "restore or rebuild that folder") from exc
        unet.eval()
        return unet, scheduler

    def save_parts(self, folder: str | os.PathLike, index: dict) -> None:
        """Write ``unet/`` (safetensors), ``scheduler/`` and ``model_index.json``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(folder / "unet", safe_serialization=True)
        self.scheduler.save_pretrained(folder / "scheduler")
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
