"""Quality: Fréchet distance between feature statistics of samples and of real images.

torchmetrics' FID with a custom feature module (the digit world's oracle features here, the
analogue of Inception features), so the maths is the library's, not ours.
"""

from __future__ import annotations

import torch
from torch import nn


def frechet_distance(feature_module: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> float:
    """FD between ``real`` and ``fake`` images ``(N, 3, H, W)`` in [-1, 1] under ``feature_module``.

    ``feature_module`` takes uint8 images and has an int ``num_features`` attribute.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=feature_module, reset_real_features=True)
    to_u8 = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
    fid.update(to_u8(real), real=True)
    fid.update(to_u8(fake), real=False)
    return float(fid.compute())
