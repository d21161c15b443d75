"""RGD (Ko et al. 2024, class-conditional reference code): the restricted gradient with g_r taken
over the WHOLE (small, diverse) remain set every step, as the mean of its minibatch gradients.
"""

from .base import Method
from .rg import METHOD as RG
from .rg import rg_combine

METHOD = Method(
    name="rgd",
    summary="restricted gradient with the remain gradient over the whole remain set",
    uses_remain=True,
    remain_scope="full",
    combine=rg_combine,
    projects=True,
    defaults={"lr": 5e-5, "steps": 100, "remain_weight": 1.6},
    # The class world: rg's own values (one source), so the class demo's rg/rgd ablation compares at
    # one setting.
    class_world_defaults=dict(RG.class_world_defaults),
)
