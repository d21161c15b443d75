"""Class-wise evaluation of the embedded class-conditional track (PAPER.md §4, the CIFAR-10 metrics):

* UA (unlearning accuracy) = 1 − fraction of samples conditioned on the forgotten class that the
  classifier assigns to that class (higher = more forgotten);
* RA (remaining accuracy) = fraction of samples conditioned on the other classes assigned to their
  own class (higher = better kept);
* FD: Fréchet distance of the classifier's features between the remaining-class samples and real
  renders of the same classes from held-out glyphs (lower = better quality).

The classifier is the digit world's oracle (trained on renders only). For a user's own model the
same numbers come from ``diffunlearn eval --metrics classifier,fid`` (zero-shot CLIP or a
classifier folder, see :mod:`diffunlearn.evaluate.classifier`).
"""

from __future__ import annotations

import dataclasses

import torch

from ..utils import image_seeds
from ..worlds.oracle import Oracle, OracleFeatures
from .quality import frechet_distance


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


def unlearning_accuracy(predicted: torch.Tensor, target: int) -> float:
    """UA = 1 − fraction of ``predicted`` labels equal to ``target`` (NaN for no samples)."""
    return float("nan") if len(predicted) == 0 else 1.0 - float((predicted == target).float().mean())


def remaining_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """RA = fraction of ``predicted`` equal to the conditioning ``labels`` (NaN for no samples)."""
    return float("nan") if len(predicted) == 0 else float((predicted == labels).float().mean())


def remain_labels(target: int, num_classes: int, n: int) -> torch.Tensor:
    """``n`` labels cycling through every class except ``target`` (as even as ``n`` allows)."""
    others = torch.tensor([c for c in range(num_classes) if c != target])
    return others[torch.arange(n) % len(others)]


def evaluate_classes(adapter, oracle: Oracle, target: int, n: int = 100, seed: int = 1, steps: int = 20,
                     guidance: float = 2.0, progress: bool = True) -> ClassEvaluation:
    """Sample ``n`` images of the forgotten class and ``n`` spread over the others (image i uses seed
    ``seed * 100000 + i``; the same seeds for every model) and score UA, RA and FD."""
    from ..worlds.class_digits import render_classes

    names = adapter.class_names
    labels = torch.cat([torch.full((n,), target), remain_labels(target, len(names), n)])
    images = adapter.sample([names[i] for i in labels.tolist()], image_seeds(seed, len(labels)), steps=steps,
                            guidance=guidance,
                            progress=progress and f"sampling evaluation: every class ({names[target]} forgotten)")
    predicted = oracle.predict(images)[:, 0]
    per_class = {name: float((predicted[labels == i] == i).float().mean()) for i, name in enumerate(names)
                 if bool((labels == i).any())}
    rest = labels[n:]
    real = render_classes(rest.repeat(4), torch.Generator().manual_seed(seed), split="test")
    return ClassEvaluation(
        ua=unlearning_accuracy(predicted[:n], target), ra=remaining_accuracy(predicted[n:], rest),
        fd=frechet_distance(OracleFeatures(oracle), real, images[n:]), accuracy_per_class=per_class,
        forget_images=images[:n], remain_images=images[n:], remain_labels=rest)
