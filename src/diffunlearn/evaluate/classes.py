"""Class-wise evaluation of the embedded class-conditional track (PAPER.md §4, the CIFAR-10 metrics):

* UA (unlearning accuracy) = 1 − fraction of samples conditioned on the forgotten class that the
  classifier assigns to that class (higher = more forgotten);
* RA (remaining accuracy) = fraction of samples conditioned on the other classes assigned to their
  own class (higher = better kept);
* FD: Fréchet distance of the classifier's features between the remaining-class samples and real
  renders of the same classes from held-out glyphs (lower = better quality).

The classifier is the digit world's oracle (trained on renders only), through the registry's
``classifier`` metric (``classifier="embedded:oracle"``), so UA and RA are computed by the same code as
``diffunlearn eval --metrics classifier``. For a user's own model the
same numbers come from ``diffunlearn eval --metrics classifier,fid`` (zero-shot CLIP or a
classifier folder, see :mod:`diffunlearn.evaluate.classifier`).
"""

from __future__ import annotations

import dataclasses

import torch

from ..utils import image_seeds
from .base import MetricOptions, score_sets
from .classifier import ORACLE

PLAN = {"classifier": ("forget", "remain"), "fid": ("remain",)}  # the registry metrics of the in-run evaluation
ORACLE_BATCH = 512  # images per oracle pass (the oracle's own default)


@dataclasses.dataclass
class ClassEvaluation:
    ua: float
    ra: float
    fd: float
    accuracy_per_class: dict[str, float]   # oracle accuracy of each class's own samples
    forget_images: torch.Tensor
    remain_images: torch.Tensor
    remain_labels: torch.Tensor

    def metrics(self) -> dict:
        return {"ua": self.ua, "ra": self.ra, "fd": self.fd, "accuracy_per_class": self.accuracy_per_class}

    def as_eval_metrics(self) -> dict:
        """UA, RA and FD in the ``diffunlearn eval`` schema, under the ``classifier`` metric's names
        (UA on the ``forget`` set, RA on ``remain``) and FD as the oracle's quality."""
        return {"classifier": {"forget": {"ua": self.ua, "ua_complement": 1.0 - self.ua}, "remain": {"ra": self.ra}},
                "oracle": {"remain": {"quality_fd": self.fd}}}


def remain_labels(target: int, num_classes: int, n: int) -> torch.Tensor:
    """``n`` labels cycling through every class except ``target`` (as even as ``n`` allows)."""
    others = torch.tensor([c for c in range(num_classes) if c != target])
    return others[torch.arange(n) % len(others)]


def evaluate_classes(adapter, target: int, n: int = 100, seed: int = 1, steps: int = 20, guidance: float = 2.0,
                     progress: bool = True) -> ClassEvaluation:
    """Sample ``n`` images of the forgotten class and ``n`` spread over the others (image i uses seed
    ``seed * 100000 + i``; the same seeds for every model) and score UA, RA and FD with the registry's
    ``classifier`` (the oracle's digit reading) and ``fid`` (oracle features) metrics."""
    from ..worlds.digits import render_classes

    names = adapter.class_names
    labels = torch.cat([torch.full((n,), target), remain_labels(target, len(names), n)])
    prompts = [names[i] for i in labels.tolist()]
    images = adapter.sample(prompts, image_seeds(seed, len(labels)), steps=steps, guidance=guidance,
                            progress=progress and f"sampling evaluation: every class ({names[target]} forgotten)")
    rest = labels[n:]
    real = render_classes(rest.repeat(4), torch.Generator().manual_seed(seed), split="test")
    options = MetricOptions(classifier=ORACLE, classes=tuple(names), target_class=names[target], feature="oracle",
                            reference_images=real, batch_size=ORACLE_BATCH)
    scored = score_sets(PLAN, {"forget": (images[:n], prompts[:n]), "remain": (images[n:], prompts[n:])}, options)
    predicted = [s["predicted"] for r in scored["classifier"].values() for s in r.per_sample]
    per_class = {name: sum(p == name for p, q in zip(predicted, prompts) if q == name) / prompts.count(name)
                 for name in names if name in prompts}
    return ClassEvaluation(
        ua=scored["classifier"]["forget"].aggregate["ua"], ra=scored["classifier"]["remain"].aggregate["ra"],
        fd=scored["fid"]["remain"].aggregate["fid"], accuracy_per_class=per_class,
        forget_images=images[:n], remain_images=images[n:], remain_labels=rest)


PROBE_SEED = 17  # the early-stop check's image seeds: neither the evaluation's (1, 7) nor the data's


def forget_probe(adapter, target: int, n: int, steps: int = 20, guidance: float = 2.0) -> float:
    """1 − UA on ``n`` samples of the forgotten class at seeds no evaluation uses: the training-side
    check of ``early_stop_every`` (the class world's forget score)."""
    names = adapter.class_names
    prompts = [names[target]] * n
    images = adapter.sample(prompts, image_seeds(PROBE_SEED, n), steps=steps, guidance=guidance, progress=False)
    options = MetricOptions(classifier=ORACLE, classes=tuple(names), target_class=names[target], feature="oracle",
                            batch_size=ORACLE_BATCH)
    scored = score_sets({"classifier": ("forget",)}, {"forget": (images, prompts)}, options)
    return 1.0 - scored["classifier"]["forget"].aggregate["ua"]
