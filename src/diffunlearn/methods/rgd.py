"""RGD (Ko et al. 2024, class-conditional reference code): the restricted gradient with g_r taken
over the WHOLE (small, diverse) remain set every step, as the mean of its minibatch gradients.
"""

from ..updates import restricted_gradient
from .base import Method

METHOD = Method(
    name="rgd",
    summary="restricted gradient with the remain gradient over the whole remain set",
    uses_remain=True,
    remain_scope="full",
    combine=lambda forget, remain, weight, gram=None: restricted_gradient(forget, remain, weight, gram),
    projects=True,
    defaults={"lr": 5e-5, "steps": 100, "remain_weight": 1.6},
)
