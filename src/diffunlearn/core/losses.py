"""Losses: pure functions returning per-sample tensors. They never step, log or save."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

CAPS = ("hinge", "elementwise", "none")


def draw_noise(x0: Tensor, adapter, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Noise ε ~ N(0, I) like ``x0``, then one training timestep per sample from the model's own
    density (``adapter.draw_timesteps``), both from ``generator`` in that order."""
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    return noise, adapter.draw_timesteps(x0.shape[0], generator).to(x0.device)


def _weighted(err: Tensor, weight: Tensor | None) -> Tensor:
    return err if weight is None else err * weight.to(err.device, err.dtype).view(-1, *([1] * (err.ndim - 1)))


def noise_prediction_error(adapter, x0: Tensor, condition, noise: Tensor, timesteps: Tensor) -> Tensor:
    """Element-wise squared error (f_θ(x_t, t, c) − target)², shape of ``x0``, with x_t, the target
    and an optional per-sample weight from the model's ``training_terms`` (ε for ε-prediction, the
    velocity for v-prediction models such as SD 2.x at 768 px: the denoising loss in each model's
    own output)."""
    x_t, target, weight = adapter.training_terms(x0, noise, timesteps)
    return _weighted((adapter.predict_noise(x_t, timesteps, condition).float() - target.float()) ** 2, weight)


def denoising_loss(adapter, x0: Tensor, condition, noise: Tensor, timesteps: Tensor) -> Tensor:
    """ℓ(θ; x, c) = ‖ε_θ(x_t, t, c) − ε‖² averaged over pixels: shape ``(N,)``."""
    return noise_prediction_error(adapter, x0, condition, noise, timesteps).flatten(1).mean(1)


def forget_objective(adapter, x0: Tensor, condition, noise: Tensor, timesteps: Tensor, cap: str = "hinge",
                     margin: float = 1.1, alpha: float = 0.1,
                     batch_mean: Callable[[Tensor], float] | None = None) -> tuple[Tensor, Tensor]:
    """The forget loss to MINIMISE, L_f = −capped ℓ (gradient ascent on the denoising loss).

    Caps (PAPER.md §1):
      * ``hinge`` (the SD reference): while the batch ε-MSE is ≤ ``margin`` the objective is −ℓ;
        above it the batch gives no gradient (the reference's ``loss / torch.norm(loss)`` hard stop).
      * ``elementwise`` (the class-conditional reference): −mean(min((ε_θ − ε)², ``alpha``)).
      * ``none``: unbounded ascent −ℓ.

    ``batch_mean`` maps this batch's mean ε-MSE to the one the hinge compares with ``margin``;
    data-parallel callers pass a function returning the GLOBAL batch's mean, so every process takes
    the same hinge decision as one process holding the whole batch would.

    Returns:
        (objective, per-sample denoising loss ℓ detached): the scalar to differentiate, and ``(N,)``.
    """
    err = noise_prediction_error(adapter, x0, condition, noise, timesteps)
    per_sample = err.flatten(1).mean(1)
    if cap == "hinge":
        batch = per_sample.mean()
        decided_on = batch_mean(batch.detach()) if batch_mean is not None else batch.item()
        objective = -batch if decided_on <= margin else batch * 0.0
    elif cap == "elementwise":
        objective = -torch.clamp(err, max=alpha).flatten(1).mean(1).mean()
    elif cap == "none":
        objective = -per_sample.mean()
    else:
        raise ValueError(f"unknown forget cap {cap!r}; use one of {', '.join(CAPS)}")
    return objective, per_sample.detach()


def esd_target(eps_uncond: Tensor, eps_concept: Tensor, eta: float = 1.0) -> Tensor:
    """ESD's negatively guided target (Gandikota et al. 2023): ε(∅) − η·(ε(c) − ε(∅)), from a FROZEN
    copy of the original model; the trained model's ε(x_t, c) is pulled towards it."""
    return eps_uncond - eta * (eps_concept - eps_uncond)


def matching_loss(adapter, x0: Tensor, condition, noise: Tensor, timesteps: Tensor, target_fn: Callable
                  ) -> tuple[Tensor, Tensor]:
    """Mean squared distance of the model's prediction at x_t from a target computed without gradient
    by ``target_fn(x_t, timesteps)`` (ESD's guided target, SalUn's anchor prediction).

    Returns:
        (scalar objective to minimise, per-sample loss ``(N,)`` detached)
    """
    x_t = adapter.training_terms(x0, noise, timesteps)[0]
    with torch.no_grad():
        target = target_fn(x_t, timesteps)
    per_sample = ((adapter.predict_noise(x_t, timesteps, condition).float() - target.float()) ** 2).flatten(1).mean(1)
    return per_sample.mean(), per_sample.detach()
