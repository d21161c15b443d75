"""What every red-team attack shares: its inputs (:class:`AttackTarget`), its output
(:class:`AttackOutput`), the :class:`Attack` protocol and small helpers.

An attack tries to make an unlearned model show the forgotten concept again. It returns sets of
attacked samples; the job (``diffunlearn.jobs.attack``) scores them with the ordinary metrics
(oracle, NudeNet, classifier) and reports the attack success rate (ASR): the fraction of attacked
samples in which the metric detects the concept. Attacks never score, log or save.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch

from ..errors import UserError


@dataclasses.dataclass
class AttackTarget:
    """The attacked model and everything an attack may use.

    Attributes:
        adapter: the attacked model (any adapter; attacks call its methods, never change its weights).
        concept: the concept that should stay forgotten (a digit/colour, a template name, a class).
        prompts: the ``n`` held-out forget prompts the attacked samples answer (text attacks edit them).
        seeds: one sampler seed per prompt.
        steps, guidance, batch_size: sampler settings (the model's own evaluation settings).
        images: ``(M, 3, H, W)`` in [-1, 1], images OF the concept (inversion and relearning objectives).
        image_prompts: the ``M`` prompts of those images (relearning trains on them).
        pairs: training-vocabulary (with concept, without concept) prompt lists, index-paired, or ``None``.
        benign: held-out prompts without the concept (Ring-A-Bell adds the concept vector to them), or ``None``.
        paraphrases: prompts naming the concept in words training never used, or ``None``.
        neutral: the prompt the embedding inversion starts from.
        seed: seeds the attack's own randomness (noise, timesteps, batches).
        progress: show progress bars.
    """

    adapter: Any
    concept: str
    prompts: list[str]
    seeds: list[int]
    steps: int
    guidance: float
    batch_size: int
    images: torch.Tensor
    image_prompts: list[str]
    pairs: tuple[list[str], list[str]] | None = None
    benign: list[str] | None = None
    paraphrases: list[str] | None = None
    neutral: str = ""
    seed: int = 0
    progress: bool = False

    def sample(self, prompts: list[str]) -> torch.Tensor:
        """Samples of the attacked model for ``prompts`` (one per seed of :attr:`seeds`, in order)."""
        return self.adapter.sample(prompts, self.seeds[:len(prompts)], steps=self.steps, guidance=self.guidance,
                                   batch_size=self.batch_size,
                                   progress=self.progress and f"sampling attacked model: {len(prompts)} prompts")

    def sample_condition(self, condition: Any) -> torch.Tensor:
        """Samples for an attacked condition (one row per seed)."""
        return self.adapter.sample_condition(condition, self.seeds[:len(condition)], steps=self.steps,
                                             guidance=self.guidance, batch_size=self.batch_size,
                                             progress=self.progress and "sampling attacked model: attacked conditions")


@dataclasses.dataclass
class AttackSamples:
    """One set of attacked samples: ``variant`` names it inside the attack (``""``, ``"k=30"``, ``"eta=3"``)."""

    variant: str
    images: torch.Tensor
    prompts: list[str]


@dataclasses.dataclass
class AttackOutput:
    """What an attack returns.

    Attributes:
        samples: the attacked sample sets, each scored separately.
        headline: which set gives the attack's ASR: a variant name, or ``"max"`` (the attacker keeps
            the strongest setting).
        details: JSON-serialisable facts for the manifest (losses, prompts found, ...).
    """

    samples: list[AttackSamples]
    headline: str = "max"
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@runtime_checkable
class Attack(Protocol):
    """A red-team attack. ``name`` is its registry key; ``settings()`` its knobs (recorded)."""

    name: str

    def applies(self, adapter: Any) -> str | None:
        """``None`` when the attack can run on this model, else one sentence saying why not."""

    def settings(self) -> dict[str, Any]: ...

    def run(self, target: AttackTarget) -> AttackOutput: ...


def is_text_model(adapter: Any) -> bool:
    """Whether the model is conditioned on text (token states) rather than on class labels."""
    return adapter.condition_kind == "text"


def device_of(adapter: Any) -> torch.device:
    """Where the adapter's networks live (every adapter says so through ``device``)."""
    return torch.device(adapter.device)


@contextlib.contextmanager
def frozen_model(adapter: Any) -> Iterator[None]:
    """The attacked network in eval mode with no parameter gradients (only the attack's own tensors
    learn); its ``requires_grad`` flags and mode are restored afterwards."""
    unet = adapter.unet
    flags = [p.requires_grad for p in unet.parameters()]
    was_training = unet.training
    unet.requires_grad_(False).eval()
    try:
        yield
    finally:
        for p, flag in zip(unet.parameters(), flags):
            p.requires_grad_(flag)
        unet.train(was_training)


def denoising_batches(target: AttackTarget, iterations: int, batch_size: int, generator: torch.Generator
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``iterations`` random minibatches ``(indices, x0, noise, t)`` over the concept images, in the
    space the model denoises, on the adapter's device (seeded by ``generator``)."""
    device = device_of(target.adapter)
    x0_all = target.adapter.encode_images(target.images)
    num_t = int(target.adapter.num_train_timesteps)
    for _ in range(iterations):
        idx = torch.randint(len(x0_all), (min(batch_size, len(x0_all)),), generator=generator)
        x0 = x0_all[idx]
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        t = torch.randint(num_t, (len(idx),), generator=generator)
        yield idx, x0.to(device), noise.to(device), t.to(device)


def positive(value: Any, name: str, kind: type = int) -> Any:
    """Check one attack setting: a positive finite number of ``kind``.

    Raises:
        UserError: not a positive number.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and value == value \
        and value != float("inf")
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok:
        raise UserError(f"attack setting {name} must be a positive {'integer' if kind is int else 'number'}, "
                        f"got {value!r}")
    return kind(value)
