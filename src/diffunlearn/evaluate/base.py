"""The metric layer of ``diffunlearn eval``: options, results, the ``Metric`` protocol and the registry.

Every metric takes a set of generated images with the prompts they were generated from and returns
one :class:`MetricResult`: set-level numbers (``aggregate``), one dict per image (``per_sample``, in
input order) and what a reader needs to reproduce the numbers (``settings``, written to the
evaluation's manifest). The metrics follow the paper's evaluation (PAPER.md §4):

* ``alignment``: CLIP alignment score AS, cosine between an image and its own prompt;
* ``classifier``: UA/RA of class-wise unlearning with zero-shot CLIP (or a user classifier);
* ``fid`` / ``kid``: distance to a folder of real images in CLIP, oracle or Inception features;
* ``oracle``: the digit world's exact forget score and attribute alignment;
* ``nudenet``: NudeNet exposed-body-part counts (``evaluate/nudenet.py``).

Heavy imports (transformers, torchmetrics, nudenet) happen inside the factories and metrics, so
importing this module is cheap and a missing optional package only matters for the metric needing it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from ..errors import UserError


@dataclasses.dataclass
class MetricOptions:
    """Settings shared by all metrics; each metric reads only the fields it needs.

    Attributes:
        clip_model: CLIP for ``alignment``, zero-shot ``classifier`` and ``fid``/``kid`` with
            ``feature="clip"``: a local folder (transformers layout, safetensors) or a hub id, which
            is read from the local Hugging Face cache unless ``HF_HUB_OFFLINE=0``. The default is the
            transformers conversion of the paper's open_clip ViT-B-32 ``laion2b_s34b_b79k``.
        nudenet_threshold: NudeNet detection score threshold (the paper's 0.6).
        feature: feature space of ``fid``/``kid``: ``"clip"``, ``"oracle"`` (digit world) or
            ``"inception"`` (needs torch-fidelity).
        reference: folder of real images (PNG/JPEG, searched recursively) for ``fid``/``kid``.
        reference_images: real images in memory, ``(N, 3, H, W)`` float in [-1, 1], used instead of
            ``reference`` (a run's in-run evaluation renders its references; they are quantised to
            uint8 exactly as a PNG of them would be).
        classes: class names for the ``classifier`` metric (zero-shot prompts, truth parsing).
        target_class: the forgotten class (``classifier`` on the ``forget`` set).
        classifier: optional folder of a transformers image classifier (safetensors) used instead
            of zero-shot CLIP; its labels come from ``config.id2label``. ``embedded:oracle`` is the
            digit world's oracle (its digit reading), the classifier of the embedded class model.
        concept: the digit world's forgotten concept (``oracle`` metric), e.g. ``"three"``.
        kid_subset_size: KID subset size; the metric uses ``min(this, n_real, n_fake)``.
        batch_size: images (or texts) per forward pass.
        device: torch device the metric models run on.
        cache_dir: where reference-image features are cached; ``""`` = no disk cache.
    """

    clip_model: str = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    nudenet_threshold: float = 0.6
    feature: str = "clip"
    reference: str = ""
    reference_images: torch.Tensor | None = None
    classes: tuple[str, ...] = ()
    target_class: str = ""
    classifier: str = ""
    concept: str = ""
    kid_subset_size: int = 50
    batch_size: int = 32
    device: str = "cpu"
    cache_dir: str = ""


@dataclasses.dataclass
class MetricResult:
    """What one metric says about one image set.

    Attributes:
        name: the metric's registry name.
        aggregate: set-level numbers, e.g. ``{"alignment": 0.35, "alignment_std": 0.03}``.
        per_sample: one JSON-serialisable dict per image, in input order; ``[]`` for set-level
            metrics (``fid``, ``kid``).
        settings: what to record in the manifest (model ids, thresholds, feature, reference hash...).
    """

    name: str
    aggregate: dict[str, float]
    per_sample: list[dict[str, Any]]
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, for JSON."""
        return dataclasses.asdict(self)


@runtime_checkable
class Metric(Protocol):
    """A metric over generated images.

    ``score(images, prompts, set_name)``: ``images`` is ``(N, 3, H, W)`` float in [-1, 1], ``prompts``
    the ``N`` prompts the images were generated from (same order), ``set_name`` the prompt set
    (``"forget"``, ``"remain"``, ``"i2p"``...); metrics that do not depend on it ignore it.
    ``settings()`` may be called before or after ``score`` and must not require scoring first.
    """

    name: str

    def settings(self) -> dict[str, Any]: ...

    def score(self, images: torch.Tensor, prompts: list[str], set_name: str) -> MetricResult: ...


def check_inputs(images: torch.Tensor, prompts: list[str]) -> None:
    """Raise ``ValueError`` unless ``images`` is ``(N, 3, H, W)`` floating point with ``N == len(prompts)``.

    A mismatch is a bug of the caller (the suite generates one image per prompt), not a user mistake.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (N, 3, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [-1, 1], got {images.dtype}")
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")


def _alignment(options: MetricOptions) -> Metric:
    from .alignment import AlignmentMetric

    return AlignmentMetric(options)


def _fid(options: MetricOptions) -> Metric:
    from .fid import FIDMetric

    return FIDMetric(options)


def _kid(options: MetricOptions) -> Metric:
    from .fid import KIDMetric

    return KIDMetric(options)


def _classifier(options: MetricOptions) -> Metric:
    from .classifier import ClassifierMetric

    return ClassifierMetric(options)


def _oracle(options: MetricOptions) -> Metric:
    from .oracle_metric import OracleMetric

    return OracleMetric(options)


def _nudenet(options: MetricOptions) -> Metric:
    try:
        from .nudenet import NudeNetMetric
    except ModuleNotFoundError as e:
        # Only our own module missing means "not in this installation"; a missing dependency of it
        # (nudenet, onnxruntime) must surface with its own message.
        if e.name != f"{__package__}.nudenet":
            raise
        raise UserError("the nudenet metric is not part of this installation of diffunlearn") from None
    return NudeNetMetric(options)


# Explicit registry: name -> factory. The imports stay inside the factories so that a metric's
# dependencies load only when it is asked for.
FACTORIES: dict[str, Callable[[MetricOptions], Metric]] = {
    "alignment": _alignment,
    "fid": _fid,
    "kid": _kid,
    "classifier": _classifier,
    "oracle": _oracle,
    "nudenet": _nudenet,
}


def score_sets(plan: dict[str, tuple[str, ...]], sets: dict[str, tuple[torch.Tensor, list[str]]],
               options: MetricOptions) -> dict[str, dict[str, MetricResult]]:
    """Registry metrics on image sets already in memory: ``plan`` = {metric: the sets it scores},
    ``sets`` = {set: (images, prompts)}. Each metric is built once. Returns {metric: {set: result}}
    (the ``diffunlearn eval`` schema once each result is reduced to its ``aggregate``)."""
    out: dict[str, dict[str, MetricResult]] = {}
    for name, set_names in plan.items():
        metric = build_metric(name, options)
        out[name] = {s: metric.score(sets[s][0], sets[s][1], s) for s in set_names}
    return out


def build_metric(name: str, options: MetricOptions | None = None) -> Metric:
    """Build the metric registered as ``name`` with ``options`` (defaults when ``None``).

    Raises:
        UserError: unknown name, or options the metric rejects.
    """
    factory = FACTORIES.get(name)
    if factory is None:
        raise UserError(f"unknown metric {name!r}; use one of: {', '.join(FACTORIES)}")
    return factory(options if options is not None else MetricOptions())
