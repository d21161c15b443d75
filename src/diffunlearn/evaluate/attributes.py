"""Oracle reading of samples: which requested attributes a generated image shows.

This is the digit world's analogue of the paper's CLIP alignment score (PAPER.md §4): instead of a
cosine between embeddings it asks a near-perfect attribute classifier whether each requested
attribute is present, so alignment is an exact fraction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..utils import image_seeds
from ..worlds import digits as world
from ..worlds.digits import Caption
from ..worlds.oracle import Oracle


def attribute_hits(predicted: torch.Tensor, captions: Sequence[Caption]) -> dict[str, list[bool | None]]:
    """Per sample and attribute: True/False if the caption requested it, None otherwise.

    Args:
        predicted: ``(N, 3)`` oracle predictions (digit, colour, background).
    """
    hits: dict[str, list[bool | None]] = {a: [] for a in world.ATTRIBUTES}
    for row, cap in zip(predicted.tolist(), captions):
        for j, a in enumerate(world.ATTRIBUTES):
            want = getattr(cap, a)
            hits[a].append(None if want is None else row[j] == want)
    return hits


def alignment_scores(predicted: torch.Tensor, captions: Sequence[Caption]) -> dict[str, float]:
    """``all``: fraction of samples with every requested attribute right; plus per attribute."""
    hits = attribute_hits(predicted, captions)
    result: dict[str, float] = {}
    all_ok = [all(hits[a][i] is not False for a in world.ATTRIBUTES) for i in range(len(captions))]
    result["all"] = sum(all_ok) / max(len(all_ok), 1)
    for a in world.ATTRIBUTES:
        asked = [h for h in hits[a] if h is not None]
        result[a] = sum(asked) / len(asked) if asked else float("nan")
    return result


def sample_and_read(adapter, oracle: Oracle, captions: Sequence[Caption], seed: int, steps: int,
                    guidance: float, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one image per caption with a seeded generator and read it with the oracle."""
    images = adapter.sample([c.text for c in captions], image_seeds(seed, len(captions)), steps=steps,
                            guidance=guidance, progress=progress and f"sampling {len(captions)} checking prompts")
    return images, oracle.predict(images)
