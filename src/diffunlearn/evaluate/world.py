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
    """The in-run scores. With several concepts ``forget_score`` is the mean over the concepts,
    ``forget_scores`` each concept's (its own held-out forget prompts, no other listed concept in
    them), and the remain set shows none of the concepts; ``forget_images`` holds the concepts' sets
    one after another (``n`` each)."""

    forget_score: float
    alignment: float
    alignment_per_attribute: dict[str, float]
    quality_fd: float
    forget_images: torch.Tensor
    remain_images: torch.Tensor
    forget_captions: list[Caption]
    remain_captions: list[Caption]
    forget_scores: dict[str, float] = dataclasses.field(default_factory=dict)

    def metrics(self) -> dict:
        out = {"forget_score": self.forget_score, "alignment": self.alignment,
               "alignment_per_attribute": self.alignment_per_attribute, "quality_fd": self.quality_fd}
        if len(self.forget_scores) > 1:
            out["forget_scores"] = dict(self.forget_scores)
        return out

    def as_eval_metrics(self) -> dict:
        """The same numbers in the ``diffunlearn eval`` schema (metric -> set -> aggregate), under the
        names the ``oracle`` metric uses, so ``compare`` reads every run the same way."""
        remain = {"alignment": self.alignment, **{f"alignment_{k}": v for k, v in self.alignment_per_attribute.items()},
                  "quality_fd": self.quality_fd}
        out = {"oracle": {"forget": {"forget_score": self.forget_score}, "remain": remain}}
        if len(self.forget_scores) > 1:  # one forget set per concept, as `diffunlearn eval` names its sets
            out["oracle"].update({f"forget:{c}": {"forget_score": v} for c, v in self.forget_scores.items()})
        return out


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
    concepts = [c.strip() for c in concept.split(",") if c.strip()]
    forget_caps, remain_caps = eval_sets(",".join(concepts), n, split=split)
    prompts = [c.text for c in forget_caps + remain_caps]
    seeds = image_seeds(seed, len(prompts))
    images = adapter.sample(prompts, seeds, steps=steps, guidance=guidance,
                            progress=progress and f"sampling evaluation: forget {concept!r} + remain ({split})")
    nf = len(forget_caps)
    f_img, r_img = images[:nf], images[nf:]
    # Real reference: four renders of every remain caption, from held-out glyphs.
    gen = torch.Generator().manual_seed(seed)
    real, _ = world.render_captions(remain_caps * 4, gen, split="test")
    options = MetricOptions(concept=concepts[0], feature="oracle", reference_images=real, batch_size=ORACLE_BATCH)
    scored = score_sets(PLAN, {"forget": (f_img[:n], prompts[:n]), "remain": (r_img, prompts[nf:])}, options)
    remain = scored["oracle"]["remain"].aggregate
    scores = {concepts[0]: scored["oracle"]["forget"].aggregate["forget_score"]}
    for j, c in enumerate(concepts[1:], start=1):  # each further concept's own forget set, by its own oracle
        rows = slice(j * n, (j + 1) * n)
        more = score_sets({"oracle": ("forget",)}, {"forget": (f_img[rows], prompts[rows])},
                          dataclasses.replace(options, concept=c))
        scores[c] = more["oracle"]["forget"].aggregate["forget_score"]
    return WorldEvaluation(
        forget_score=sum(scores.values()) / len(scores), alignment=remain["alignment"],
        # An attribute no remain prompt requests has no alignment: NaN, as before (the metric leaves it out).
        alignment_per_attribute={a: remain.get(f"alignment_{a}", float("nan")) for a in world.ATTRIBUTES},
        quality_fd=scored["fid"]["remain"].aggregate["fid"],
        forget_images=f_img, remain_images=r_img, forget_captions=forget_caps, remain_captions=remain_caps,
        forget_scores=scores)


PROBE_SEED = 17  # the early-stop check's prompts and image seeds: neither the evaluation's (1, 7) nor the data's


def forget_probe(adapter, concept: str, n: int, steps: int = 12, guidance: float = 3.0) -> float:
    """The forget score on ``n`` TRAINING-vocabulary forget prompts per concept (mean over the
    concepts of ``concept``): the training-side check of ``early_stop_every``. Held-out prompts are
    never sampled here, so stopping on it selects nothing on the reported numbers."""
    concepts = [c.strip() for c in concept.split(",") if c.strip()]
    forget_caps, _ = eval_sets(",".join(concepts), n, split="train", seed=PROBE_SEED)
    prompts = [c.text for c in forget_caps]
    images = adapter.sample(prompts, image_seeds(PROBE_SEED, len(prompts)), steps=steps, guidance=guidance,
                            progress=False)
    scores = []
    for j, c in enumerate(concepts):
        rows = slice(j * n, (j + 1) * n)
        options = MetricOptions(concept=c, feature="oracle", batch_size=ORACLE_BATCH)
        scored = score_sets({"oracle": ("forget",)}, {"forget": (images[rows], prompts[rows])}, options)
        scores.append(scored["oracle"]["forget"].aggregate["forget_score"])
    return sum(scores) / len(scores)


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
