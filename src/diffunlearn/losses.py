"""Losses: pure functions returning per-sample tensors. They never step, log or save."""

from __future__ import annotations

import torch
from torch import Tensor

CAPS = ("hinge", "elementwise", "none")


def draw_noise(x0: Tensor, num_train_timesteps: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Noise ε ~ N(0, I) like ``x0`` and timesteps t ~ U{0..T−1}, one per sample, from ``generator``."""
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    t = torch.randint(num_train_timesteps, (x0.shape[0],), generator=generator).to(x0.device)
    return noise, t


def noise_prediction_error(adapter, x0: Tensor, condition, noise: Tensor, timesteps: Tensor) -> Tensor:
    """Element-wise squared error (ε_θ(x_t, t, c) − ε)², shape of ``x0``."""
    x_t = adapter.add_noise(x0, noise, timesteps)
    return (adapter.predict_noise(x_t, timesteps, condition).float() - noise.float()) ** 2


def denoising_loss(adapter, x0: Tensor, condition, noise: Tensor, timesteps: Tensor) -> Tensor:
    """ℓ(θ; x, c) = ‖ε_θ(x_t, t, c) − ε‖² averaged over pixels: shape ``(N,)``."""
    return noise_prediction_error(adapter, x0, condition, noise, timesteps).flatten(1).mean(1)


def forget_objective(adapter, x0: Tensor, condition, noise: Tensor, timesteps: Tensor, cap: str = "hinge",
                     margin: float = 1.1, alpha: float = 0.1) -> tuple[Tensor, Tensor]:
    """The forget loss to MINIMISE, L_f = −capped ℓ (gradient ascent on the denoising loss).

    Caps (PAPER.md §1):
      * ``hinge`` (the SD reference): while the batch ε-MSE is ≤ ``margin`` the objective is −ℓ;
        above it the batch gives no gradient (the reference's ``loss / torch.norm(loss)`` hard stop).
      * ``elementwise`` (the class-conditional reference): −mean(min((ε_θ − ε)², ``alpha``)).
      * ``none``: unbounded ascent −ℓ.

    Returns:
        (objective, per-sample denoising loss ℓ detached): the scalar to differentiate, and ``(N,)``.
    """
    err = noise_prediction_error(adapter, x0, condition, noise, timesteps)
    per_sample = err.flatten(1).mean(1)
    if cap == "hinge":
        batch = per_sample.mean()
        objective = -batch if batch.item() <= margin else batch * 0.0
    elif cap == "elementwise":
        objective = -torch.clamp(err, max=alpha).flatten(1).mean(1).mean()
    elif cap == "none":
        objective = -per_sample.mean()
    else:
        raise ValueError(f"unknown forget cap {cap!r}; use one of {', '.join(CAPS)}")
    return objective, per_sample.detach()
