"""Gradient difference (GradDiff): forget ascent plus weighted remain descent, d = g_f + λ·g_r.

On diverse paired data this is the paper's "GradDiffD" baseline (Ko et al. 2024, §5).
"""

from ..core.updates import summed_direction
from .base import Method

METHOD = Method(
    name="graddiff",
    summary="gradient difference: g_f + λ·g_r on paired batches",
    uses_remain=True,
    remain_scope="batch",
    combine=lambda forget, remain, weight, gram=None: summed_direction(forget, remain, weight),
    # "three": the method study's pick under the every-seed rule (training mean 0.007 / 0.993; held
    # out 0.017 / 0.997, ASR 0.38); before, the older sweep's lr 5e-5, λ 4 (README "Tuning").
    # Colours: the study's pick on "red", with remain_neighbours from the study that searched it as
    # well (training 0.01 / 1.00 against 0.00 / 0.98 without; held out 0.017 / 0.983 against 0.000 / 0.953).
    defaults={"lr": 1.25e-4, "steps": 100, "remain_weight": 4.89, "margin": 0.244},
    modifier_defaults={"lr": 1.25e-4, "remain_weight": 4.89, "margin": 0.244, "remain_neighbours": 0.545},
)
