"""MGDA, Désidéri, "Multiple-gradient descent algorithm (MGDA) for multiobjective optimization",
C. R. Math. 2012, solved with the Frank-Wolfe algorithm of Sener & Koltun, "Multi-Task Learning as
Multi-Objective Optimization", NeurIPS 2018: the minimum-norm point of the convex hull of
[g_f, λ·g_r] (weights ≥ 0 summing to 1).

It changes the direction on every step, conflicting or not, and shrinks towards zero near a point
where the two losses cannot both decrease (a zero forget gradient gives a zero direction).

Computed from the 2×2 Gramian of [g_f, λ·g_r] through ``torchjd.aggregation.MGDAWeighting`` (see
:mod:`diffunlearn.methods.jd`): the direction is w0·g_f + w1·λ·g_r, with no flat gradient copies.
"""

from .jd import gramian_method

METHOD = gramian_method(
    "mgda", "MGDAWeighting", projects=False,
    summary="MGDA (Désidéri 2012; Sener & Koltun 2018): min-norm point of the hull of [g_f, λ·g_r]",
    # From `diffunlearn study` (README "Method study"), the training-side pick of 4 trials per concept.
    defaults={"lr": 5.85e-5, "remain_weight": 6.73, "margin": 0.165},
    modifier_defaults={"lr": 1.23e-4, "remain_weight": 1.46, "margin": 0.306})
