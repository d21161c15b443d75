"""The ``prompts`` task: a text-to-image model unlearns from index-paired forget and remain prompts
whose images the base model generates itself (PAPER.md §3).

Digit-world concepts are scored in the run by the oracle (forget score, alignment, quality FD on
the held-out prompts). A Stable Diffusion run gets a before/after picture of held-out prompts
(``samples_forget.png``, ``samples_remain.png``) and is scored by ``diffunlearn eval``.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from ..data.images import generate_image_set
from ..data.templates import TEMPLATES
from ..data.training import build_training_data, prompt_texts, sample_batch, training_prompts
from ..utils import image_seeds
from . import TrainingSet

PREVIEW_PROMPTS = 4  # held-out prompts per set in a Stable Diffusion run's before/after picture


def _preview(adapter, cfg, folder: Path, model_id: str, progress: bool, parallel):
    """Held-out (test-vocabulary) forget and remain prompts sampled with fixed seeds."""
    k = min(PREVIEW_PROMPTS, cfg.eval_prompts)
    forget_p, remain_p = training_prompts(cfg, split="test" if cfg.diversity == "diverse" else "train", n=k)
    prompts = prompt_texts(forget_p) + prompt_texts(remain_p)
    images = generate_image_set(adapter, model_id, prompts, image_seeds(cfg.eval_seed, len(prompts)), folder,
                                cfg.eval_steps, cfg.eval_guidance, progress, resolution=cfg.resolution,
                                batch_size=sample_batch(adapter, cfg), parallel=parallel)
    return prompts, images


class PromptTask:
    """See the module docstring."""

    name = "prompts"

    @staticmethod
    def scored_in_run(cfg) -> bool:
        """Whether the run has a built-in judge: the oracle, for a digit-world concept."""
        return cfg.concepts[0] not in TEMPLATES

    def check(self, adapter, cfg) -> None:
        """Nothing to check here: the config already validated the concept and its prompts."""

    def build(self, adapter, folder, cfg, data_dir: Path, progress: bool = True, parallel=None,
              replace: bool = True, donors=()) -> TrainingSet:
        from ..methods import get_method

        if not get_method(cfg.method).needs_images:  # a closed-form edit (UCE) reads text only
            return TrainingSet(None, None, None, None, {"prompts": "none: a closed-form edit from the concept's words",
                                                        "folder": None})
        fx, fc, rx, rc, _, _ = build_training_data(adapter, folder, cfg, data_dir, progress, parallel, replace=replace,
                                                    donors=donors)
        info = {"prompts": "templates:" + cfg.concept if cfg.concepts[0] in TEMPLATES else "digit-world",
                "pairs": cfg.num_pairs, "diversity": cfg.diversity,
                "remain_neighbours": cfg.remain_neighbours, "data_seed": cfg.data_seed,
                "sampler_steps": cfg.data_steps, "guidance": cfg.data_guidance, "folder": str(data_dir)}
        return TrainingSet(fx, fc, rx, rc, info)

    def before(self, adapter, cfg, out: Path, base_model: str, progress: bool, parallel):
        if self.scored_in_run(cfg):
            return None
        return _preview(adapter, cfg, out / "samples" / "base", "base:" + base_model, progress, parallel)

    def evaluate(self, adapter, cfg, data: TrainingSet, progress: bool):
        if not self.scored_in_run(cfg):
            return None
        from ..evaluate.world import evaluate_world

        return evaluate_world(adapter, cfg.concept, cfg.eval_prompts, cfg.eval_split, cfg.eval_seed,
                              cfg.eval_steps, cfg.eval_guidance, progress)

    def forget_probe(self, adapter, cfg, data: TrainingSet):
        if not self.scored_in_run(cfg):
            return None
        from ..evaluate.world import forget_probe

        return lambda: forget_probe(adapter, cfg.concept, cfg.early_stop_prompts, cfg.eval_steps, cfg.eval_guidance)

    def pictures(self, before, adapter, cfg, data: TrainingSet, out: Path, progress: bool, parallel) -> None:
        if before is None:
            return
        stamp = hashlib.sha256(str(time.time_ns()).encode()).hexdigest()[:12]
        prompts, after = _preview(adapter, cfg, out / "samples" / "unlearned", f"unlearned:{stamp}", progress,
                                  parallel)
        if parallel.is_main:
            from ..report import image_grid

            k = len(prompts) // 2
            image_grid({"base": before[1][:k], cfg.method: after[:k]}, prompts[:k], out / "samples_forget.png",
                       f"held-out prompts WITH '{cfg.concept}': same prompts and seeds in both rows")
            image_grid({"base": before[1][k:], cfg.method: after[k:]}, prompts[k:], out / "samples_remain.png",
                       "held-out prompts WITHOUT the concept: same prompts and seeds in both rows")
