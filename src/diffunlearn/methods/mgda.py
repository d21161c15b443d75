"""MGDA, Désidéri, "Multiple-gradient descent algorithm (MGDA) for multiobjective optimization",
C. R. Math. 2012, solved with the Frank-Wolfe algorithm of Sener & Koltun, "Multi-Task Learning as
Multi-Objective Optimization", NeurIPS 2018: the minimum-norm point of the convex hull of
[g_f, λ·g_r] (weights ≥ 0 summing to 1).

It changes the direction on every step, conflicting or not, and shrinks towards zero near a point
where the two losses cannot both decrease (a zero forget gradient gives a zero direction).

Computed from the 2×2 Gramian of [g_f, λ·g_r] through ``torchjd.aggregation.MGDAWeighting`` (see
:mod:`diffunlearn.methods.jd`): the direction is w0·g_f + w1·λ·g_r, with no flat gradient copies.
"""

from .base import Method
from .jd import weighting_combine

METHOD = Method(
    name="mgda",
    summary="MGDA (Désidéri 2012; Sener & Koltun 2018): min-norm point of the hull of [g_f, λ·g_r]",
    uses_remain=True,
    remain_scope="batch",
    combine=weighting_combine("MGDAWeighting", "mgda"),
    projects=False,
    # rg's values as a starting point; the method study tunes lr, steps and remain_weight per rule.
    defaults={"lr": 5e-5, "steps": 100, "remain_weight": 1.6},
)
