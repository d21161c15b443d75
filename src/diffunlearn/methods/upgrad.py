"""UPGrad, Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024
(arXiv:2406.16232): each row of [g_f, λ·g_r] is projected onto the dual cone of both rows (the directions d
with d·g_f ≥ 0 and d·g_r ≥ 0, along which the step −lr·d increases neither loss to first order) and the
projections are averaged.

When the two gradients do not conflict (g_f·g_r ≥ 0) both rows already lie in the dual cone, so the
direction is their mean (g_f + λ·g_r)/2 (half the GradDiff step). With only two rows, projecting a row
onto the dual cone is projecting it off the other row on conflict (PCGrad's projection), so UPGrad here
is RG at half the step, (δ_f + λ·δ_r)/2, up to torchjd's 1e-4 regularisation of the normalised Gramian
(relative differences of 1e-5 to 1e-3 on conflict, largest for nearly opposite rows of unequal norms;
tests/test_torchjd_rules.py checks both).

Computed from the 2×2 Gramian of [g_f, λ·g_r] through ``torchjd.aggregation.UPGradWeighting`` (see
:mod:`diffunlearn.methods.jd`): the direction is w0·g_f + w1·λ·g_r, with no flat gradient copies.
"""

from .jd import gramian_method

METHOD = gramian_method(
    "upgrad", "UPGradWeighting", projects=True,
    summary="UPGrad (Quinton & Rey 2024): each of g_f, λ·g_r projected onto their dual cone, then averaged",
    # From `diffunlearn study` (README "Method study"), the training-side pick of 4 trials per concept.
    defaults={"lr": 5.85e-5, "remain_weight": 6.73, "margin": 0.165},
    modifier_defaults={"lr": 1.25e-4, "remain_weight": 4.89, "margin": 0.244})
