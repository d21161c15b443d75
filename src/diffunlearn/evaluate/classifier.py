"""Class-wise unlearning accuracy (UA) and remaining accuracy (RA), as the paper measures them.

PAPER.md §4: images are generated for the forgotten class and for the other classes; a classifier
labels them; UA = 1 − fraction of forget-class images labelled as the forgotten class, RA = accuracy
on the other classes. The paper's classifier is zero-shot CLIP ViT-B/32 over the class names plus
"random noise" (so an image of noise need not be forced into a class). Here the classifier is either
that zero-shot CLIP (``options.clip_model``, prompts ``"a photo of a {name}."``), a user's
transformers image classifier (``options.classifier``, labels from its ``config.id2label``), or, for the
embedded class-conditional model, the digit world's oracle (``options.classifier="embedded:oracle"``).

Ground truth of a remain image is parsed from its prompt: the class name that occurs in the prompt
as a whole word or phrase, case-insensitively (the longest one when several match, e.g.
"fire truck" over "truck"; the earliest when equally long). Prompts that name no class are left out
of RA and counted in ``unscored``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from .base import MetricOptions, MetricResult, check_inputs

NOISE_CLASS = "random noise"
PROMPT_TEMPLATE = "a photo of a {name}."
ORACLE = "embedded:oracle"  # options.classifier: the digit world's oracle reads the digit (embedded class model)


def _norm(label: str) -> str:
    return " ".join(label.strip().lower().split())


def unlearning_accuracy(pred: Sequence[str], target: str) -> float:
    """UA = 1 − fraction of ``pred`` equal to ``target`` (case- and space-insensitive); NaN if empty."""
    if not pred:
        return float("nan")
    t = _norm(target)
    return 1.0 - sum(_norm(p) == t for p in pred) / len(pred)


def remaining_accuracy(pred: Sequence[str], truth: Sequence[str | None]) -> float:
    """RA = fraction of ``pred[i] == truth[i]`` over the ``i`` with a known truth; NaN if none is known."""
    if len(pred) != len(truth):
        raise ValueError(f"{len(pred)} predictions but {len(truth)} labels")
    pairs = [(p, t) for p, t in zip(pred, truth) if t is not None]
    if not pairs:
        return float("nan")
    return sum(_norm(p) == _norm(t) for p, t in pairs) / len(pairs)


def class_in_prompt(prompt: str, classes: Sequence[str]) -> str | None:
    """The class named in ``prompt`` (see the module docstring for the rule), or ``None``."""
    text = _norm(prompt)
    best: tuple[int, int, str] | None = None  # (-length, position, class): min() picks longest, then earliest
    for name in classes:
        words = _norm(name)
        if not words:
            continue
        match = re.search(rf"(?<![\w]){re.escape(words)}(?![\w])", text)
        if match:
            candidate = (-len(words), match.start(), name)
            best = candidate if best is None or candidate[:2] < best[:2] else best
    return best[2] if best else None


class ClassifierMetric:
    """UA on the ``"forget"`` set, RA on every other set.

    ``score`` returns, per image, ``{"predicted": label, "true": class parsed from the prompt or None}``
    and as aggregate:

    * set ``"forget"``: ``{"ua", "noise_fraction"}``; every image counts (the set is by definition
      conditioned on ``options.target_class``);
    * other sets: ``{"ra", "noise_fraction", "scored", "unscored"}`` (images with / without a class
      named in their prompt).

    ``noise_fraction`` is the fraction labelled ``"random noise"`` (zero-shot CLIP only).

    Raises (at construction):
        UserError: no classes (zero-shot), a target class that is not one of them, a missing classifier folder.
    """

    name = "classifier"

    def __init__(self, options: MetricOptions) -> None:
        self.options = options
        self._model: Any = None
        self._preprocess: Any = None
        self._text_emb: torch.Tensor | None = None
        if options.classifier == ORACLE:
            from ..worlds.digits import DIGITS

            self.labels = list(DIGITS)
            self.classes = list(options.classes) or list(self.labels)
        elif options.classifier:
            folder = Path(options.classifier)
            if not (folder / "config.json").is_file():
                raise UserError(f"the classifier folder {folder} has no config.json; pass a folder saved with "
                                "transformers' save_pretrained (safetensors)")
            import json

            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            id2label = config.get("id2label") or {}
            self.labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
            if not self.labels:
                raise UserError(f"the classifier in {folder} has no id2label in its config.json; add the class names")
            self.classes = list(options.classes) or list(self.labels)
        else:
            if not options.classes:
                raise UserError("the classifier metric needs the class names; pass --classes, e.g. "
                                "--classes airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck")
            self.classes = list(options.classes)
            # The paper's extra label: an image of noise is not forced into a class.
            self.labels = self.classes + ([NOISE_CLASS] if NOISE_CLASS not in map(_norm, self.classes) else [])
        if options.target_class and _norm(options.target_class) not in map(_norm, self.classes):
            raise UserError(f"the target class {options.target_class!r} is not one of the classes "
                            f"({', '.join(self.classes)}); pass it in --classes")
        if options.target_class and _norm(options.target_class) not in map(_norm, self.labels):
            # A user classifier that cannot output the target would report UA = 1 whatever the images show.
            raise UserError(f"the classifier in {options.classifier} cannot predict the target class "
                            f"{options.target_class!r}; its labels are: {', '.join(self.labels)}")

    # -- classifiers ----------------------------------------------------------------------------------------------

    def _load(self) -> None:
        if self._model is not None:
            return
        if self.options.classifier == ORACLE:
            from ..worlds.oracle import load_oracle

            self._model = load_oracle().to(self.options.device)
        elif self.options.classifier:
            from transformers import AutoModelForImageClassification

            from .clip import preprocess_from_config, read_preprocessor_config

            try:
                model = AutoModelForImageClassification.from_pretrained(
                    self.options.classifier, use_safetensors=True, local_files_only=True, dtype=torch.float32)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot load the image classifier in {self.options.classifier} as safetensors; "
                                "save it with transformers' save_pretrained") from e
            size = getattr(model.config, "image_size", 224)
            size = size if isinstance(size, int) else int(size[0])
            # Without a processor config: resize to the model's size, mean/std 0.5 (transformers' ViT default).
            self._preprocess = preprocess_from_config(read_preprocessor_config(self.options.classifier), size,
                                                      (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
            self._model = model.to(self.options.device).eval()
        else:
            from .clip import load_clip

            clip = load_clip(self.options.clip_model, self.options.device)
            self._model = clip
            self._text_emb = clip.text_embeddings([PROMPT_TEMPLATE.format(name=n) for n in self.labels],
                                                  self.options.batch_size)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[str]:
        """Labels (from :attr:`labels`) of ``(N, 3, H, W)`` images in [-1, 1], by argmax."""
        self._load()
        if self.options.classifier == ORACLE:
            # Column 0 of the oracle's reading is the digit (16x16 images, as the class model makes).
            x = images.float().clamp(-1, 1).to(self.options.device)
            index = self._model.predict(x, batch_size=max(self.options.batch_size, 1))[:, 0].cpu()
        elif self.options.classifier:
            device = next(self._model.parameters()).device
            out = []
            for i in range(0, len(images), self.options.batch_size):
                pixels = self._preprocess(images[i:i + self.options.batch_size].to(device))
                out.append(self._model(pixel_values=pixels).logits.argmax(-1).cpu())
            index = torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
        else:
            if self._text_emb is None:
                raise RuntimeError("zero-shot class embeddings were not built before predict()")
            # Argmax of cosine = argmax of CLIP's logits (logit_scale > 0 only rescales them).
            emb = self._model.image_embeddings(images, self.options.batch_size)
            index = (emb @ self._text_emb.T).argmax(-1)
        return [self.labels[int(i)] for i in index]

    # -- metric ---------------------------------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """Classifier identity, the label set and the target class."""
        info: dict[str, Any] = {"labels": list(self.labels), "classes": list(self.classes),
                                "target_class": self.options.target_class,
                                "truth": "class name occurring in the prompt (longest, then earliest)"}
        if self.options.classifier == ORACLE:
            from .fid import weights_fingerprint

            self._load()
            info.update({"classifier": "digit-world oracle (digit reading)",
                         "classifier_weights": weights_fingerprint(self._model)})
        elif self.options.classifier:
            from .fid import content_hash

            folder = Path(self.options.classifier)
            files = sorted(p for p in folder.iterdir() if p.is_file())
            info.update({"classifier": str(folder), "classifier_sha256": content_hash(files, folder)})
        else:
            from .clip import load_clip

            info.update({"classifier": "zero-shot CLIP", "prompt_template": PROMPT_TEMPLATE,
                         **load_clip(self.options.clip_model, self.options.device).settings(self.options.clip_model)})
        return info

    def check(self, set_names: list[str]) -> None:
        """Before any image is made: the forget set needs the target class."""
        if "forget" in set_names and not self.options.target_class:
            raise UserError("the classifier metric on the forget set needs the forgotten class; pass --target-class")

    def score(self, images: torch.Tensor, prompts: list[str], set_name: str) -> MetricResult:
        """UA when ``set_name == "forget"``, RA otherwise.

        Raises:
            UserError: the forget set without ``options.target_class``; a non-forget set whose prompts
                name none of the classes.
        """
        check_inputs(images, prompts)
        if set_name == "forget" and not self.options.target_class:
            raise UserError("the classifier metric on the forget set needs the forgotten class; pass --target-class")
        pred = self.predict(images)
        truth = [class_in_prompt(p, self.classes) for p in prompts]
        noise = sum(_norm(p) == NOISE_CLASS for p in pred) / len(pred) if pred else float("nan")
        if set_name == "forget":
            aggregate = {"ua": unlearning_accuracy(pred, self.options.target_class), "noise_fraction": noise}
        else:
            scored = sum(t is not None for t in truth)
            if pred and not scored:
                raise UserError(f"no prompt of the {set_name!r} set names one of the classes "
                                f"({', '.join(self.classes)}), so remaining accuracy has no ground truth")
            aggregate = {"ra": remaining_accuracy(pred, truth), "noise_fraction": noise,
                         "scored": float(scored), "unscored": float(len(truth) - scored)}
        per_sample = [{"predicted": p, "true": t} for p, t in zip(pred, truth)]
        return MetricResult(self.name, aggregate, per_sample, self.settings())
