"""IMTL-G, Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021, in the generalised form of
Quinton & Rey 2024 (linearly dependent rows allowed): the combination of [g_f, λ·g_r] (weights summing
to 1) whose projections onto the unit rows g_f/‖g_f‖ and g_r/‖g_r‖ are equal.

It changes the direction on every step, conflicting or not; λ changes only the step's length (the
unit rows, and so the direction, do not depend on it).

Computed from the 2×2 Gramian of [g_f, λ·g_r] through ``torchjd.aggregation.IMTLGWeighting`` (see
:mod:`diffunlearn.methods.jd`): the direction is w0·g_f + w1·λ·g_r, with no flat gradient copies.
"""

from .jd import gramian_method

METHOD = gramian_method(
    "imtlg", "IMTLGWeighting", projects=False,
    summary="IMTL-G (Liu et al. 2021): combination of [g_f, λ·g_r] with equal projections on both")
