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
    defaults={"lr": 5e-5, "steps": 100, "remain_weight": 1.6},
)
