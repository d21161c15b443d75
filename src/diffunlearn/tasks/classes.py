"""The ``classes`` task: a class-conditional model unlearns one class (the paper's CIFAR-10 setting,
PAPER.md §3-4).

The data are real images with class labels: the embedded digits (``embedded:digits-class``) or the
user's ImageFolder / ``.npz`` (config key ``images``). Forget set D_f = every image of the class
``concept``; remain set D_r = ``remain_per_class`` random images of each other class (the paper's
diverse set), or the same total from the classes named in ``remain_classes`` (the low-diversity
control). The training loop pairs forget and remain rows by index, so the shorter set is cycled
(:func:`diffunlearn.data.classes.pair_indices`). The selection is written to ``data/selection.json``.

The embedded model is scored in the run by the oracle (UA, RA, FD); every run gets ``samples.png``
(each class, before and after, same seeds).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data.classes import ClassDataset, load_class_images, pair_indices, resolve_class, select_sets, selection_record
from ..errors import UserError
from ..families import EMBEDDED_CLASS
from ..utils import atomic_write_text, image_seeds
from . import TrainingSet

SAMPLES_PER_CLASS = 4  # columns per class in samples.png


def _default_names(names: tuple[str, ...]) -> bool:
    return tuple(names) == tuple(str(i) for i in range(len(names)))


def load_class_data(adapter, cfg) -> ClassDataset:
    """The training images of a class-conditional run, checked against the model.

    A model that records no class names (a plain diffusers DDPM folder: "0".."K-1") takes the data
    set's names when the class counts agree (ImageFolder's sorted folder names are the label order
    torch-style training uses).

    Raises:
        UserError: no ``images`` for a non-embedded model, or a data set whose classes, image size or
            channels do not match the model.
    """
    if cfg.images:
        data = load_class_images(cfg.images, image_size=adapter.image_size, channels=adapter.channels)
    elif cfg.model == EMBEDDED_CLASS:
        from ..worlds.class_digits import class_dataset

        data = class_dataset(seed=cfg.data_seed)
    else:
        raise UserError("a class-conditional model is unlearned from its own training images; set images=FOLDER "
                        "(one sub-folder per class) or images=FILE.npz (arrays images, labels, classes)")
    names = tuple(adapter.class_names)
    if tuple(data.class_names) != names:
        if len(data.class_names) == len(names) and _default_names(names):
            adapter.class_names = tuple(data.class_names)
        else:
            raise UserError(f"the images in {cfg.images or cfg.model} have classes {', '.join(data.class_names)} but "
                            f"the model has {', '.join(names)}; use the data set the model was trained on")
    return data


def class_training_data(adapter, cfg, data_dir: Path | None = None):
    """Index-paired forget and remain images with their labels (the loop's conditions).

    Returns:
        (forget_x0, forget_labels, remain_x0, remain_labels, target, record): ``record`` is the
        selection (written to ``data_dir/selection.json`` when ``data_dir`` is given).
    """
    data = load_class_data(adapter, cfg)
    target = resolve_class(cfg.concept, data.class_names)
    control = [resolve_class(c, data.class_names) for c in cfg.remain_classes.split(",") if c.strip()] or None
    forget_idx, remain_idx = select_sets(data.labels, target, cfg.remain_per_class, control, cfg.data_seed,
                                        class_names=data.class_names)
    record = selection_record(data, target, forget_idx, remain_idx, cfg.remain_per_class, control, cfg.data_seed)
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(data_dir / "selection.json", json.dumps(record, indent=2) + "\n")
    f, r = pair_indices(forget_idx, remain_idx, cfg.data_seed)
    return (adapter.encode_images(data.images[f]), data.labels[f], adapter.encode_images(data.images[r]),
            data.labels[r], target, record)


def class_samples(adapter, cfg, k: int = SAMPLES_PER_CLASS) -> torch.Tensor:
    """``k`` samples of every class, the same seeds for every model (class-major order)."""
    names = adapter.class_names
    prompts = [name for name in names for _ in range(k)]
    return adapter.sample(prompts, image_seeds(cfg.eval_seed, len(prompts)), steps=cfg.eval_steps,
                          guidance=cfg.eval_guidance, batch_size=cfg.sample_batch_size or 256)


def samples_picture(before: torch.Tensor, after: torch.Tensor, names, target: int, method: str, path: Path,
                    k: int = SAMPLES_PER_CLASS) -> None:
    """Rows: base and unlearned; columns: ``k`` samples of each class (same seeds in both rows)."""
    from ..report import image_grid

    labels = [f"{name}{' (forgotten)' if i == target else ''}" for i, name in enumerate(names) for _ in range(k)]
    image_grid({"base": before, method: after}, labels, path,
               f"every class, {k} samples each; forgotten: {names[target]}")


class ClassTask:
    """See the module docstring."""

    name = "classes"

    def __init__(self) -> None:
        # (config, selection) of the last config seen: `check` then `build` of one run read and encode
        # its images once (a user's image folder can take minutes to load).
        self._last: tuple[str, tuple] | None = None

    def _selection(self, adapter, cfg) -> tuple:
        key = json.dumps(cfg.to_dict(), sort_keys=True)
        if self._last is None or self._last[0] != key:
            self._last = (key, class_training_data(adapter, cfg))
        return self._last[1]

    def check(self, adapter, cfg) -> None:
        self._selection(adapter, cfg)  # bad data (classes, sizes, the concept) fails before anything is written

    def build(self, adapter, folder, cfg, data_dir: Path, progress: bool = True, parallel=None,
              replace: bool = True) -> TrainingSet:
        fx, fc, rx, rc, target, record = self._selection(adapter, cfg)
        if parallel is None or parallel.is_main:
            data_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(data_dir / "selection.json", json.dumps(record, indent=2) + "\n")
        info = {"images": record["source"], "forget_images": record["forget_count"], "remain": record["mode"],
                "remain_per_class": record["per_class"], "data_seed": cfg.data_seed,
                "selection": str(data_dir / "selection.json")}
        return TrainingSet(fx, fc, rx, rc, info, {"target_class": target, "remain_classes": cfg.remain_classes})

    def before(self, adapter, cfg, out: Path, base_model: str, progress: bool, parallel):
        return class_samples(adapter, cfg) if parallel.is_main else None

    def evaluate(self, adapter, cfg, data: TrainingSet, progress: bool):
        if cfg.model != EMBEDDED_CLASS:
            return None
        from ..evaluate.classes import evaluate_classes

        return evaluate_classes(adapter, data.results["target_class"], cfg.eval_prompts, cfg.eval_seed,
                                cfg.eval_steps, cfg.eval_guidance, progress)

    def forget_probe(self, adapter, cfg, data: TrainingSet):
        if cfg.model != EMBEDDED_CLASS:
            return None
        from ..evaluate.classes import forget_probe

        target = data.results["target_class"]
        return lambda: forget_probe(adapter, target, cfg.early_stop_prompts, cfg.eval_steps, cfg.eval_guidance)

    def pictures(self, before, adapter, cfg, data: TrainingSet, out: Path, progress: bool, parallel) -> None:
        if parallel.is_main and before is not None:
            samples_picture(before, class_samples(adapter, cfg), adapter.class_names, data.results["target_class"],
                            cfg.method,
                            out / "samples.png")
