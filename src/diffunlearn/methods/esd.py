"""Erased Stable Diffusion (ESD), Gandikota et al., "Erasing Concepts from Diffusion Models", ICCV 2023.

The model's noise prediction for the concept prompt is trained towards a frozen copy's NEGATIVELY
guided prediction, ε_θ(x_t, c) → ε₀(x_t, ∅) − η·(ε₀(x_t, c) − ε₀(x_t, ∅)) (:func:`losses.esd_target`).
Only forget prompts are used. x_t comes from noising the base model's own samples for those prompts,
an equivalent of ESD's partial sampling that reuses the data every method here shares.
Variants by parameter selection: ESD-u (``non-cross-attention``) and ESD-x (``cross-attention``).
"""

import torch

from ..core.losses import esd_target
from ..core.updates import summed_direction
from .base import Method
from .objectives import Bound, Matching


def _guided_target(run: Bound):
    """``fn(chunk, x_t, t)``: the frozen reference's ε(∅) − η·(ε(c) − ε(∅)) at the chunk's x_t."""
    uncond = run.adapter.encode_prompts([""])
    device, reference, eta = run.engine.device, run.reference, run.cfg.esd_eta

    def target(c, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        empty = uncond[torch.zeros(len(x_t), dtype=torch.long)].to(device)
        return esd_target(reference.predict_noise(x_t, t, empty), reference.predict_noise(x_t, t, c.cond), eta)

    return target


ESD_OBJECTIVE = Matching("esd", _guided_target, settings=("esd_eta",))


def _esd(name: str, selection: str, summary: str, defaults: dict, modifier_defaults: dict | None = None) -> Method:
    return Method(
        name=name,
        summary=summary,
        uses_remain=False,
        remain_scope="batch",
        # The ESD loss is minimised directly: the direction is its gradient (no remain term).
        combine=lambda forget, remain, weight, gram=None: summed_direction(forget),
        forget=ESD_OBJECTIVE,
        variant={"selection": selection},
        defaults={"steps": 100, **defaults},
        modifier_defaults=dict(modifier_defaults or {}),
    )


# From `diffunlearn study` (README "Method study"): the point the tuning rule picks on TRAINING-prompt
# scores, 4 trials per method. ESD-u, "three": training forget 0.05 / alignment 0.75 (the sweep's
# earlier lr 8e-4, eta 1 gave 0.050 / 0.412); on "red" nothing forgets, the lowest forget is below.
ESD_U = _esd("esd-u", "non-cross-attention", "ESD-u (Gandikota et al. 2023): negative guidance, non-cross-attention",
             {"lr": 7.5e-5, "esd_eta": 3.62}, {"lr": 1.61e-4, "esd_eta": 2.41})
# ESD-x, "three" and "red" alike: training forget 0.00 / alignment 0.88 on "three" (earlier lr 2e-4, eta 1:
# 0.025 / 0.775).
ESD_X = _esd("esd-x", "cross-attention", "ESD-x (Gandikota et al. 2023): negative guidance, cross-attention only",
             {"lr": 1.61e-4, "esd_eta": 2.41})
