"""Restricted gradient (RG), Ko et al., "Boosting Alignment for Post-Unlearning Text-to-Image
Generative Models", NeurIPS 2024: conflict-only mutual projection of g_f and g_r, then δ_f + λ·δ_r,
with the remain gradient from the remain minibatch paired with the forget minibatch.
"""

from ..core.updates import restricted_gradient_k
from .base import Method


def rg_combine(forget, remain, weight, gram=None):
    """RG's ``combine``: the restricted gradient of the k forget gradients and the remain gradient
    (k = 1: the paper's rule; k > 1: its PCGrad form, ``updates.pcgrad_weights``)."""
    return restricted_gradient_k(forget, remain, weight, gram)


METHOD = Method(
    name="rg",
    summary="restricted gradient (Ko et al. 2024) on paired minibatches",
    uses_remain=True,
    remain_scope="batch",
    combine=rg_combine,
    projects=True,
    # From `diffunlearn study` (README "Method study"): searched and picked on training prompts, reported
    # on held-out prompts over seeds 0-2. "three": forget 0.007, alignment 0.997, embedding ASR 0.23.
    # "red": the study with `remain_neighbours` searched too (training 0.05 / 1.00, against 0.00 / 0.99
    # for the values before, lr 1.25e-4, λ 4.89, m 0.244, no neighbours); held out 0.020 / 0.930,
    # against 0.013 / 0.877.
    defaults={"lr": 3.63e-5, "steps": 100, "remain_weight": 0.606, "margin": 0.0582},
    modifier_defaults={"lr": 3.33e-5, "remain_weight": 1.31, "margin": 0.898, "remain_neighbours": 0.275},
)
