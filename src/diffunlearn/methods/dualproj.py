"""DualProj, Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024
(arXiv:2406.16232): the mean of [g_f, λ·g_r] projected onto the dual cone of both rows (the
projection of GEM, Lopez-Paz & Ranzato 2017, applied to the mean).

Without conflict the mean lies in the cone and is kept, (g_f + λ·g_r)/2; on conflict it is projected
so that neither loss increases to first order.

Computed from the 2×2 Gramian of [g_f, λ·g_r] through ``torchjd.aggregation.DualProjWeighting`` (see
:mod:`diffunlearn.methods.jd`): the direction is w0·g_f + w1·λ·g_r, with no flat gradient copies.
"""

from .jd import gramian_method

METHOD = gramian_method(
    "dualproj", "DualProjWeighting", projects=True,
    summary="DualProj (Quinton & Rey 2024): mean of [g_f, λ·g_r] projected onto their dual cone")
