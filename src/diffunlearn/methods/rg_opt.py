"""Optimizer-aware restricted gradient (``rg-opt``): RG's direction, then Adam's realised step
restricted so that neither loss increases to first order (issue 13 §3; beyond the paper).

RG (Ko et al. 2024) guarantees first-order progress on both losses for the RAW direction
d = δ_f + λ·δ_r, but Adam does not step along d: it steps along its preconditioned momentum, and
in the digit world both losses fell on only 68% of RG's steps. ``rg-opt`` lets Adam propose its
update u (moments and step counts advance as usual), then replaces u with its Euclidean
projection onto {u : g_f·u ≤ 0, g_r·u ≤ 0}, the cone of steps that ascend the forget loss and
descend the remain loss to first order (``updates.cone_correction``; a 2-constraint KKT solution
from five scalars, then u − a·g_f − b·g_r per parameter). Cost: both gradients and one copy of the
trainable weights stay alive during the step.
"""

from ..updates import restricted_gradient
from .base import Method

METHOD = Method(
    name="rg-opt",
    summary="optimizer-aware RG: Adam's realised step projected so neither loss rises to first order",
    uses_remain=True,
    remain_scope="batch",
    combine=lambda forget, remain, weight, gram=None: restricted_gradient(forget, remain, weight, gram),
    projects=True,
    restrict_update=True,
    defaults={"lr": 5e-5, "steps": 100, "remain_weight": 1.6},  # rg's values until the study tunes them
)
