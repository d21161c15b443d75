"""SalUn, Fan et al., "SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency in Both
Image Classification and Generation", ICLR 2024.

A saliency mask keeps the ``saliency_fraction`` (default 0.5) of parameter entries with the largest
forget-loss gradient magnitude, computed once on the original model; only those entries train. The
forget prompt's prediction is remapped to a frozen copy's prediction for an anchor prompt (the
paired remain prompt, or ``anchor`` when set, e.g. "a person wearing clothes" for nudity), plus λ
times the remain loss: d = g_remap + λ·g_r, masked.
"""

from ..updates import gradient_difference
from .base import Method

METHOD = Method(
    name="salun",
    summary="SalUn (Fan et al. 2024): saliency-masked remap to an anchor prompt plus the remain loss",
    uses_remain=True,
    remain_scope="batch",
    combine=lambda forget, remain, weight, gram=None: gradient_difference(forget, remain, weight),
    forget_loss="remap",
    saliency=True,
    # Tuned on training prompts with `scripts/tune-baselines.sh` (README "Tuning").
    defaults={"lr": 8e-4, "steps": 100, "remain_weight": 1.0},
)
