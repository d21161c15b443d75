"""Aligned-MTL, Senushkin et al., "Independent Component Alignment for Multi-Task Learning", CVPR 2023:
the rows [g_f, λ·g_r] are made orthogonal with equal norms (the smallest singular value of the
2-row Jacobian) by a balance transform computed from the eigendecomposition of their Gramian, then
averaged.

It changes the direction on every step, conflicting or not.

Computed from the 2×2 Gramian of [g_f, λ·g_r] through ``torchjd.aggregation.AlignedMTLWeighting`` (see
:mod:`diffunlearn.methods.jd`): the direction is w0·g_f + w1·λ·g_r, with no flat gradient copies.
"""

from .jd import gramian_method

METHOD = gramian_method(
    "aligned-mtl", "AlignedMTLWeighting", projects=False,
    summary="Aligned-MTL (Senushkin et al. 2023): mean of [g_f, λ·g_r] after aligning their singular values")
