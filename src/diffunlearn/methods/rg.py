"""Restricted gradient (RG), Ko et al., "Boosting Alignment for Post-Unlearning Text-to-Image
Generative Models", NeurIPS 2024: conflict-only mutual projection of g_f and g_r, then δ_f + λ·δ_r,
with the remain gradient from the remain minibatch paired with the forget minibatch.
"""

from ..updates import restricted_gradient
from .base import Method

METHOD = Method(
    name="rg",
    summary="restricted gradient (Ko et al. 2024) on paired minibatches",
    uses_remain=True,
    remain_scope="batch",
    combine=lambda forget, remain, weight, gram=None: restricted_gradient(forget, remain, weight, gram),
    projects=True,
    # From `diffunlearn study` (README "Method study"): searched on training prompts, chosen on held-out
    # prompts over seeds 0-2. "three": forget 0.007, alignment 0.997, embedding ASR 0.23; "red" (a
    # modifier wants a larger λ and margin): forget 0.013, alignment 0.867.
    defaults={"lr": 3.63e-5, "steps": 100, "remain_weight": 0.606, "margin": 0.0582},
    modifier_defaults={"lr": 1.25e-4, "remain_weight": 4.89, "margin": 0.244},
)
