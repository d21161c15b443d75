"""Fine-tuning (FT) on the remain set only: the weakest baseline in Ko et al. (NeurIPS 2024), which
relies on catastrophic forgetting of everything the remain set does not show."""

from .base import Method
from .objectives import NO_FORGET

METHOD = Method(
    name="ft",
    weighs_remain=False,
    summary="fine-tune on the remain set only (no forget term)",
    uses_remain=True,
    remain_scope="batch",
    combine=lambda forget, remain, weight, gram=None: [r.clone() for r in remain],  # the forget list is empty
    forget=NO_FORGET,
    # Tuned on training prompts with the grid sweep of README "Tuning"; the method study (4 trials) found no
    # point that forgets better on the training prompts, so these stay.
    defaults={"lr": 8e-4, "steps": 100},
)
