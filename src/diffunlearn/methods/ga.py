"""Gradient ascent (GA): raise the denoising loss on the forget set, nothing else."""

from ..core.updates import summed_direction
from .base import Method

METHOD = Method(
    name="ga",
    summary="gradient ascent on the capped forget loss alone",
    uses_remain=False,
    remain_scope="batch",
    combine=lambda forget, remain, weight, gram=None: summed_direction(forget),
    # README "Tuning"; the method study (4 trials) found nothing better on the training prompts: every
    # setting forgets by destroying the model (alignment about 0.02).
    defaults={"lr": 5e-5, "steps": 100},
)
