"""The embedded class-conditional track (the paper's CIFAR-10 experiment at toy size, PAPER.md §3-4).

The ten handwritten digits of the digit world are the ten classes. An image of class ``d`` is a real
scikit-learn glyph of ``d`` drawn in a random colour on a random background, so every class is as
varied inside as a CIFAR class is (the condition names the class only). A class-conditional
diffusers ``UNet2DModel`` (``num_class_embeds`` = 10 classes + 1 "no class" label for classifier-free
guidance) is trained on fresh renders of them; the committed weights live in
``worlds/assets/digits-class`` and ``diffunlearn world train-base --track class`` rebuilds them.

The world's oracle (trained on renders only) reads the digit of a sample: the classifier behind
UA/RA, and its features are the Fréchet distance's feature space.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.classes import ClassDataset
from ..models.classcond import ClassConditionalAdapter, build_class_unet
from . import digits as world
from .digits import render_classes

CLASS_NAMES: tuple[str, ...] = world.DIGITS
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
UNET_SIZE = dict(sample_size=world.IMAGE_SIZE, channels=3, block_out_channels=(32, 64, 64), layers_per_block=1)
# Sampling settings of the class-conditional world (DDIM steps, guidance), chosen on the base model's
# accuracy with seeds the evaluation never uses (README "Class-conditional track").
SAMPLE_STEPS = 20
GUIDANCE = 2.0
# The embedded training set: this many renders per class, from the TRAIN glyphs (the analogue of
# CIFAR-10's 5000 training images per class). 250 keeps the forget set a few batches long and lets
# the two-class control draw its 450 remain images from two classes (225 each).
IMAGES_PER_CLASS = 250


@functools.lru_cache(maxsize=2)
def class_dataset(per_class: int = IMAGES_PER_CLASS, seed: int = 0, split: str = "train") -> ClassDataset:
    """The embedded training images: ``per_class`` renders of each digit (fixed for a seed).

    Cached: the class demo selects data for every (class, method) from the same set, so it is
    rendered once. Callers index it (copies) and never modify it in place."""
    labels = torch.arange(len(CLASS_NAMES)).repeat_interleave(per_class)
    images = render_classes(labels, torch.Generator().manual_seed(seed), split)
    return ClassDataset(images=images, labels=labels, class_names=CLASS_NAMES,
                        source=f"embedded:digits-class (train glyphs, {per_class} per class, seed {seed})")


def build_class_base(seed: int = 0) -> ClassConditionalAdapter:
    """An untrained class-conditional base model with the world's architecture."""
    from diffusers import DDPMScheduler

    unet = build_class_unet(len(CLASS_NAMES), seed=seed, **UNET_SIZE)
    return ClassConditionalAdapter(unet, DDPMScheduler(**SCHEDULER_CONFIG), CLASS_NAMES)


def class_accuracy(adapter, oracle, n_per_class: int = 50, seed: int = 0, steps: int = SAMPLE_STEPS,
                   guidance: float = GUIDANCE, progress: bool = False) -> dict:
    """Oracle digit accuracy of the model's samples, ``n_per_class`` per class: ``{"all", "per_class"}``."""
    from ..utils import image_seeds

    labels = torch.arange(len(CLASS_NAMES)).repeat_interleave(n_per_class)
    prompts = [CLASS_NAMES[i] for i in labels.tolist()]
    images = adapter.sample(prompts, image_seeds(seed, len(prompts)), steps=steps, guidance=guidance,
                            progress=progress)
    hit = (oracle.predict(images)[:, 0] == labels).float()
    per_class = {name: float(hit[labels == i].mean()) for i, name in enumerate(CLASS_NAMES)}
    return {"all": float(hit.mean()), "per_class": per_class}


def train_class_base(out: Path, steps: int = 2500, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                     uncond_prob: float = 0.1, eval_every: int = 500, eval_per_class: int = 50,
                     progress: bool = True, checkpoint_every: int = 250, resume: bool = False) -> dict:
    """Train the class-conditional base model on fresh renders (images never repeat).

    Labels are uniform over the ten digits; a fraction ``uncond_prob`` is replaced by the "no class"
    label so the model also learns the unconditional prediction guidance needs. Writes EMA weights
    to ``out`` at every evaluation (oracle accuracy of ``eval_per_class`` samples per class, seeds
    900000+, which no other evaluation uses) and returns the last evaluation. Checkpoints and
    ``resume`` work as in :func:`~diffunlearn.worlds.base_model.train_base`.
    """
    from tqdm.auto import tqdm

    from .base_model import RecipeCheckpoints, ema_weights, recipe_step, report, training_state
    from .oracle import load_oracle

    out = Path(out)
    args = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "uncond_prob": uncond_prob}
    gen = torch.Generator().manual_seed(seed)
    model = build_class_base(seed)
    unet = model.unet
    ema, opt, sched = training_state(unet, lr, steps)
    oracle = load_oracle()
    null = model.null_class
    ckpts = RecipeCheckpoints(out, "class", args, checkpoint_every, unet, ema, opt, sched, gen)
    log, first = ckpts.start(resume, steps)
    unet.train()
    bar = tqdm(range(first, steps + 1), desc="train-base (class)", disable=not progress, initial=first - 1,
               total=steps)
    for step in bar:
        labels = torch.randint(len(CLASS_NAMES), (batch_size,), generator=gen)
        x0 = render_classes(labels, gen)
        cond = labels.clone()
        cond[torch.rand(batch_size, generator=gen) < uncond_prob] = null
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(model.num_train_timesteps, (batch_size,), generator=gen)
        loss = F.mse_loss(model.predict_noise(model.add_noise(x0, noise, t), t, cond), noise)
        recipe_step(loss, unet, opt, sched, ema)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % eval_every == 0 or step == steps:
            with ema_weights(unet, ema):
                accuracy = class_accuracy(model, oracle, n_per_class=eval_per_class, seed=9)
                entry = {"step": step, "loss": loss.item(), "minutes": ckpts.minutes(),
                         "accuracy": accuracy["all"], "per_class": accuracy["per_class"]}
                log.append(entry)
                if progress:
                    report(entry, bar)
                model.save(out)
                (out / "training.json").write_text(json.dumps({
                    "recipe": "diffunlearn.worlds.class_digits.train_class_base", "args": args,
                    "sampler": {"scheduler": "DDIM", "steps": SAMPLE_STEPS, "guidance": GUIDANCE},
                    "evaluations": log}, indent=2) + "\n")
        ckpts.after_step(step, steps, log)
    ckpts.finish(bar)
    return log[-1]
