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
    # From `diffunlearn study` (README "Method study"): searched on training prompts, picked by the
    # every-seed rule (the training scores of the held-out seeds' models, averaged), reported on held-out
    # prompts over seeds 0-2. "three": forget 0.007, alignment 0.997, embedding ASR 0.23. "red": the study
    # with `remain_neighbours` searched too; every-seed training 0.000 / 0.980 (the first-seed rule had
    # picked lr 3.33e-5, λ 1.31, m 0.898, neighbours 0.275: 0.030 / 0.937 there), held out 0.007 / 0.980.
    defaults={"lr": 3.63e-5, "steps": 100, "remain_weight": 0.606, "margin": 0.0582},
    modifier_defaults={"lr": 3.93e-5, "remain_weight": 1.21, "margin": 1.29, "remain_neighbours": 0.979},
    # The embedded class world: the class study's pick on "three" (training 0.000 / 0.950, held out
    # forget 0.053, RA 0.950, FD 2068), against the shared recipe's lr 5e-4, λ 5 under the same
    # protocol (training 0.000 / 0.700, held out 0.070 / 0.577, FD 4645; README "Class world").
    class_world_defaults={"lr": 7.5e-5, "remain_weight": 10.2},
)
