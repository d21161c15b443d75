"""Erased Stable Diffusion (ESD), Gandikota et al., "Erasing Concepts from Diffusion Models", ICCV 2023.

The model's noise prediction for the concept prompt is trained towards a frozen copy's NEGATIVELY
guided prediction, ε_θ(x_t, c) → ε₀(x_t, ∅) − η·(ε₀(x_t, c) − ε₀(x_t, ∅)) (:func:`losses.esd_target`).
Only forget prompts are used. x_t comes from noising the base model's own samples for those prompts,
an equivalent of ESD's partial sampling that reuses the data every method here shares.
Variants by parameter selection: ESD-u (``non-cross-attention``) and ESD-x (``cross-attention``).
"""

from ..updates import gradient_ascent
from .base import Method


def _esd(name: str, selection: str, summary: str, lr: float) -> Method:
    return Method(
        name=name,
        summary=summary,
        uses_remain=False,
        remain_scope="batch",
        # The ESD loss is minimised directly: the direction is its gradient (no remain term).
        combine=lambda forget, remain, weight, gram=None: gradient_ascent(forget),
        forget_loss="esd",
        variant={"selection": selection},
        # Tuned on training prompts with `scripts/tune-baselines.sh` (README "Tuning").
        defaults={"lr": lr, "steps": 100, "esd_eta": 1.0},
    )


ESD_U = _esd("esd-u", "non-cross-attention", "ESD-u (Gandikota et al. 2023): negative guidance, non-cross-attention",
             lr=8e-4)
ESD_X = _esd("esd-x", "cross-attention", "ESD-x (Gandikota et al. 2023): negative guidance, cross-attention only",
             lr=2e-4)
