"""DualProj, Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024
(arXiv:2406.16232): the mean of [g_f, λ·g_r] projected onto the dual cone of both rows (the
projection of GEM, Lopez-Paz & Ranzato 2017, applied to the mean).

Without conflict the mean lies in the cone and is kept, (g_f + λ·g_r)/2; on conflict it is projected
so that neither loss increases to first order.

Computed from the 2×2 Gramian of [g_f, λ·g_r] through ``torchjd.aggregation.DualProjWeighting`` (see
:mod:`diffunlearn.methods.jd`): the direction is w0·g_f + w1·λ·g_r, with no flat gradient copies.
"""

from .base import Method
from .jd import weighting_combine

METHOD = Method(
    name="dualproj",
    summary="DualProj (Quinton & Rey 2024): mean of [g_f, λ·g_r] projected onto their dual cone",
    uses_remain=True,
    remain_scope="batch",
    combine=weighting_combine("DualProjWeighting", "dualproj"),
    projects=True,
    # rg's values as a starting point; the method study tunes lr, steps and remain_weight per rule.
    defaults={"lr": 5e-5, "steps": 100, "remain_weight": 1.6},
)
