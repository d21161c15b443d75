"""Tasks: what a run unlearns FROM and how it is scored in the run.

A task builds the training data of a run (index-paired forget and remain rows with their
conditions) and owns the run's in-run evaluation and pictures; :func:`diffunlearn.jobs.run.run_job`
does everything else the same way for every task. Two tasks exist:

* ``prompts`` (:mod:`.prompts`): a text-to-image model; prompt pairs (the digit world's captions or
  the Stable Diffusion templates) whose images the base model generates itself (PAPER.md §3);
* ``classes`` (:mod:`.classes`): a class-conditional model; the forget set is every training image
  of one class, the remain set images of the others (PAPER.md §3-4, the CIFAR-10 setting).

:func:`task_for` is the ONE place that decides which task a config runs (before, three unrelated
tests did: the folder's model kind, whether the concept is a template name, and ``hasattr`` on the
adapter).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch


@dataclasses.dataclass
class TrainingSet:
    """A run's training data: index-paired forget and remain rows.

    Attributes:
        forget_x0, remain_x0: what the model denoises (pixels or latents), one row per pair; with
            several concepts ``forget_x0`` is a list, one set per concept, each paired with the remain set.
        forget_cond, remain_cond: the matching conditions (text embeddings or labels); a list with
            ``forget_x0``.
        info: the data section of the model card (where the data came from, how it was made).
        results: task facts that go into ``results.json`` (e.g. the forgotten class's index).
    """

    forget_x0: torch.Tensor | list[torch.Tensor]
    forget_cond: Any
    remain_x0: torch.Tensor
    remain_cond: Any
    info: dict
    results: dict = dataclasses.field(default_factory=dict)

    def fingerprint(self) -> str:
        """A short sha256 of the images the run trains on (every forget set, then the remain set), kept
        in ``results.json`` as ``training_data``, so a finished run is reused only for the same images.
        The conditions follow from the prompts that made the images and are not hashed (a FLUX run's T5
        states would be gigabytes). A closed-form method (UCE) trains on no images: its sets are
        ``None`` and hash as such. Hand-written: no library here hashes tensors' contents."""
        digest = hashlib.sha256()
        sets = self.forget_x0 if isinstance(self.forget_x0, list) else [self.forget_x0]
        for t in (*sets, self.remain_x0):
            if t is None:
                digest.update(b"none")
                continue
            t = t.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return digest.hexdigest()[:16]


class Evaluation(Protocol):
    """An in-run evaluation: ``metrics()`` gives the flat numbers a run's results carry at the top
    level (``forget_score`` ... or ``ua`` ...), ``as_eval_metrics()`` the same numbers in the
    ``diffunlearn eval`` schema (metric -> set -> aggregate) that ``compare`` reads."""

    def metrics(self) -> dict: ...

    def as_eval_metrics(self) -> dict: ...


class Task(Protocol):
    """What :func:`~diffunlearn.jobs.run.run_job` asks of a task."""

    name: str

    def check(self, adapter, cfg) -> None:
        """Validate the data of ``cfg`` against the model before anything is written (UserError)."""

    def build(self, adapter, folder: Path | None, cfg, data_dir: Path, progress: bool, parallel,
              replace: bool = True) -> TrainingSet:
        """The training data (written to, or reused from, ``data_dir``)."""

    def before(self, adapter, cfg, out: Path, base_model: str, progress: bool, parallel) -> Any:
        """What the base model shows before unlearning (for :meth:`pictures`; every process)."""

    def evaluate(self, adapter, cfg, data: TrainingSet, progress: bool) -> Evaluation | None:
        """The in-run evaluation of the unlearned model (main process), or None where the task has
        no built-in judge (a user's Stable Diffusion model is scored by ``diffunlearn eval``)."""

    def forget_probe(self, adapter, cfg, data: TrainingSet) -> Callable[[], float] | None:
        """A callable giving ``adapter``'s forget score now on TRAINING-side prompts (``early_stop_every``
        calls it during training), or None where the task has no built-in judge."""

    def pictures(self, before: Any, adapter, cfg, data: TrainingSet, out: Path, progress: bool, parallel) -> None:
        """Before/after pictures in the run folder (every process; the main one writes)."""


def task_for(cfg) -> Task:
    """The task of ``cfg``: ``classes`` for a class-conditional model, else ``prompts``."""
    from ..families import model_kind

    if model_kind(cfg.model) == "class":
        from .classes import ClassTask

        return ClassTask()
    from .prompts import PromptTask

    return PromptTask()


__all__ = ["Evaluation", "Task", "TrainingSet", "task_for"]
