"""RG computed with flat gradient vectors, as the reference code of Ko et al. (NeurIPS 2024) does:
every gradient concatenated into one vector per loss, projected, split back. Same update as ``rg``;
kept so ``diffunlearn bench`` can measure the cost of the flat copies against ``rg``.
"""

from ..core.updates import restricted_gradient_flat, single_forget
from .base import Method
from .rg import METHOD as RG

METHOD = Method(
    multi_concept=False,
    multi_concept_note="it is the reference code's two-vector form, for the bench",
    name="rg-flat",
    summary="rg with the reference code's flat gradient vectors (for benchmarks; same update as rg)",
    uses_remain=True,
    remain_scope="batch",
    combine=lambda forget, remain, weight, gram=None: restricted_gradient_flat(single_forget(forget, "rg-flat"), remain,
                                                                                         weight),
    projects=True,
    defaults=dict(RG.defaults),
)
