"""The paper's alignment score AS (PAPER.md §4): CLIP cosine between an image and its OWN prompt.

AS of a set is the mean over images of cos(CLIP image embedding, CLIP text embedding of the prompt
the image was generated from). It is the raw cosine: no ×100 and no clamp at 0 (CLIPScore's
conventions), so the paper's numbers (SD v1.4 ≈ 0.35) are directly comparable.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import MetricOptions, MetricResult, check_inputs
from .clip import ClipBundle, load_clip


def paired_cosines(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of two ``(N, D)`` L2-normalised embedding matrices -> ``(N,)``."""
    return (image_emb * text_emb).sum(dim=-1)


class AlignmentMetric:
    """Mean CLIP cosine between each image and its own prompt.

    ``score`` returns ``aggregate = {"alignment": mean, "alignment_std": std}`` (population std,
    ``ddof=0``, over the images of the set) and ``per_sample = [{"clip_cosine": c}, ...]``.
    The CLIP model is loaded on first use (``options.clip_model``, ``options.device``).
    """

    name = "alignment"

    def __init__(self, options: MetricOptions) -> None:
        self.options = options
        self._clip: ClipBundle | None = None

    @property
    def clip(self) -> ClipBundle:
        if self._clip is None:
            self._clip = load_clip(self.options.clip_model, self.options.device)
        return self._clip

    def settings(self) -> dict[str, Any]:
        """Model name/folder, config hash, preprocessing, and the definition used."""
        return {"metric": "mean cosine(CLIP image embedding, CLIP text embedding of the image's own prompt)",
                **self.clip.settings(self.options.clip_model)}

    def cosines(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``(N, 3, H, W)`` images in [-1, 1] and ``N`` prompts -> ``(N,)`` float32 cosines in [-1, 1]."""
        batch = self.options.batch_size
        return paired_cosines(self.clip.image_embeddings(images, batch), self.clip.text_embeddings(prompts, batch))

    def score(self, images: torch.Tensor, prompts: list[str], set_name: str) -> MetricResult:
        """Score one set; ``set_name`` is ignored (AS is defined the same way on every set)."""
        check_inputs(images, prompts)
        cos = self.cosines(images, prompts).double()
        aggregate = {"alignment": float(cos.mean()) if len(cos) else float("nan"),
                     "alignment_std": float(cos.std(unbiased=False)) if len(cos) else float("nan")}
        return MetricResult(self.name, aggregate, [{"clip_cosine": float(c)} for c in cos], self.settings())
