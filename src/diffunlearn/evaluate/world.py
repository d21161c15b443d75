"""Evaluation in the digit world (issue 2 §5): forget score, alignment, quality.

* forget score: fraction of samples for held-out forget prompts in which the oracle sees the
  concept (lower is better);
* alignment: fraction of samples for held-out remain prompts with every requested attribute right,
  plus per attribute (the analogue of the paper's CLIP alignment score);
* quality: Fréchet distance between oracle features of the remain samples and of real renders of
  the same captions (lower is better). Forget samples are left out: a model that forgot the
  concept SHOULD differ from renders of the concept.

The numbers come from the metric registry (:data:`PLAN`: the ``oracle`` metric on both sets, ``fid``
in oracle features on the remain set), the same code ``diffunlearn eval`` runs; this module only
samples the held-out prompts and renders the references.
"""

from __future__ import annotations

import dataclasses

import torch

from ..data.prompts import eval_sets
from ..utils import image_seeds
from ..worlds import digits as world
from ..worlds.digits import Caption
from .base import MetricOptions, score_sets

PLAN = {"oracle": ("forget", "remain"), "fid": ("remain",)}  # the registry metrics of the in-run evaluation
ORACLE_BATCH = 512  # images per oracle pass (the oracle's own default)


@dataclasses.dataclass
class WorldEvaluation:
    forget_score: float
    alignment: float
    alignment_per_attribute: dict[str, float]
    quality_fd: float
    forget_images: torch.Tensor
    remain_images: torch.Tensor
    forget_captions: list[Caption]
    remain_captions: list[Caption]

    def metrics(self) -> dict:
        return {"forget_score": self.forget_score, "alignment": self.alignment,
                "alignment_per_attribute": self.alignment_per_attribute, "quality_fd": self.quality_fd}

    def as_eval_metrics(self) -> dict:
        """The same numbers in the ``diffunlearn eval`` schema (metric -> set -> aggregate), under the
        names the ``oracle`` metric uses, so ``compare`` reads every run the same way."""
        remain = {"alignment": self.alignment, **{f"alignment_{k}": v for k, v in self.alignment_per_attribute.items()},
                  "quality_fd": self.quality_fd}
        return {"oracle": {"forget": {"forget_score": self.forget_score}, "remain": remain}}


def forget_score(predicted: torch.Tensor, concept: str) -> float:
    """Fraction of ``(N, 3)`` oracle predictions that show ``concept``."""
    attribute = world.concept_attribute(concept)
    column = world.ATTRIBUTES.index(attribute)
    return float((predicted[:, column] == world.VALUES[attribute].index(concept)).float().mean())


def evaluate_world(adapter, concept: str, n: int = 100, split: str = "test", seed: int = 1, steps: int = 12,
                   guidance: float = 3.0, progress: bool = True) -> WorldEvaluation:
    """Sample ``n`` forget and ``n`` remain prompts (seed ``seed * 100000 + i``) and score them.

    ``split="test"`` uses the held-out filler vocabulary; ``"train"`` the tuning one.
    """
    forget_caps, remain_caps = eval_sets(concept, n, split=split)
    prompts = [c.text for c in forget_caps + remain_caps]
    seeds = image_seeds(seed, len(prompts))
    images = adapter.sample(prompts, seeds, steps=steps, guidance=guidance,
                            progress=progress and f"sampling evaluation: forget {concept!r} + remain ({split})")
    f_img, r_img = images[:n], images[n:]
    # Real reference: four renders of every remain caption, from held-out glyphs.
    gen = torch.Generator().manual_seed(seed)
    real, _ = world.render_captions(remain_caps * 4, gen, split="test")
    options = MetricOptions(concept=concept, feature="oracle", reference_images=real, batch_size=ORACLE_BATCH)
    scored = score_sets(PLAN, {"forget": (f_img, prompts[:n]), "remain": (r_img, prompts[n:])}, options)
    remain = scored["oracle"]["remain"].aggregate
    return WorldEvaluation(
        forget_score=scored["oracle"]["forget"].aggregate["forget_score"], alignment=remain["alignment"],
        # An attribute no remain prompt requests has no alignment: NaN, as before (the metric leaves it out).
        alignment_per_attribute={a: remain.get(f"alignment_{a}", float("nan")) for a in world.ATTRIBUTES},
        quality_fd=scored["fid"]["remain"].aggregate["fid"],
        forget_images=f_img, remain_images=r_img, forget_captions=forget_caps, remain_captions=remain_caps)


def write_reference_renders(concept: str, out, n: int = 100, split: str = "test", seed: int = 1,
                            copies: int = 4) -> int:
    """Real images for ``fid``/``kid`` in the digit world: ``copies`` ground-truth renders of each of
    the ``n`` held-out remain captions (the reference :func:`evaluate_world` uses), as PNG files.

    Returns:
        the number of images written.
    """
    from pathlib import Path

    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _, remain_caps = eval_sets(concept, n, split=split)
    real, _ = world.render_captions(remain_caps * copies, torch.Generator().manual_seed(seed), split=split)
    for i, array in enumerate(world.to_uint8(real)):
        Image.fromarray(array).save(out / f"{i:05d}.png")
    return len(real)
