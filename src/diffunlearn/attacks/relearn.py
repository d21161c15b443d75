"""``relearn``: fine-tune the unlearned model on a few images of the concept and watch it come back.

A model that hid the concept (suppressed it in a few weights) relearns it in a handful of steps; a
model that removed it relearns it about as slowly as a model that never learned it. The attack
fine-tunes a COPY of the model (all denoiser weights, Adam, the ordinary denoising loss) on
``images`` concept images with their own prompts and samples the held-out forget prompts after
each of ``steps`` (cumulative), so the result is a relearning curve: one ASR per k. The attacked
model itself is not changed.

Relearning attacks: Lynch et al., "Eight Methods to Evaluate Robust Unlearning in LLMs" (2024) and,
for diffusion models, Suriyakumar et al., "Unstable Unlearning: The Hidden Risk of Concept
Resurgence in Diffusion Models" (2024), who show erased concepts resurge after fine-tuning.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..core.losses import denoising_loss, draw_noise
from ..errors import UserError
from .base import AttackOutput, AttackSamples, AttackTarget, device_of, positive


@dataclasses.dataclass
class RelearnAttack:
    """Settings: ``images`` concept images used, cumulative step counts ``steps`` at which to sample,
    Adam learning rate ``lr``, minibatch ``batch_size``."""

    images: int = 16
    steps: tuple[int, ...] = (5, 10, 30)
    lr: float = 1e-4
    batch_size: int = 8
    name: str = dataclasses.field(default="relearn", init=False)

    def __post_init__(self) -> None:
        self.images = positive(self.images, "relearn.images")
        steps = (self.steps,) if isinstance(self.steps, (int, float)) else tuple(self.steps)
        if not steps:
            raise UserError("attack setting relearn.steps must list at least one step count, e.g. 5,10,30")
        self.steps = tuple(sorted({positive(k, "relearn.steps") for k in steps}))
        self.lr = positive(self.lr, "relearn.lr", float)
        self.batch_size = positive(self.batch_size, "relearn.batch_size")

    def applies(self, adapter: Any) -> str | None:
        return None

    def settings(self) -> dict[str, Any]:
        return {"images": self.images, "steps": list(self.steps), "lr": self.lr, "batch_size": self.batch_size,
                "optimizer": "Adam", "trained": "all denoiser weights of a copy"}

    def run(self, target: AttackTarget) -> AttackOutput:
        from tqdm.auto import tqdm

        adapter = target.adapter
        if len(target.images) < self.images:
            raise UserError(f"relearn needs {self.images} concept images but only {len(target.images)} were given; "
                            "pass more with --images or set --option relearn.images=N")
        model = adapter.clone()
        params = list(model.unet.parameters())
        for p in params:
            p.requires_grad_(True)
        model.unet.train()
        device = device_of(model)
        x0_all = model.encode_images(target.images[:self.images])
        condition_all = model.encode_prompts(target.image_prompts[:self.images])
        optimizer = torch.optim.Adam(params, lr=self.lr)
        generator = torch.Generator().manual_seed(target.seed)
        samples, losses = [], []
        bar = tqdm(total=self.steps[-1], desc="relearning", disable=not target.progress, leave=False)
        done = 0
        for k in self.steps:
            for _ in range(k - done):
                idx = torch.randint(len(x0_all), (min(self.batch_size, len(x0_all)),), generator=generator)
                x0 = x0_all[idx].to(device)
                noise, t = draw_noise(x0, model, generator)  # the model's own timestep density
                loss = denoising_loss(model, x0, condition_all[idx], noise, t).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(round(loss.item(), 6))
                bar.update(1)
            done = k
            model.unet.eval()
            images = model.sample(target.prompts, target.seeds, steps=target.steps, guidance=target.guidance,
                                  batch_size=target.batch_size, progress=False)
            model.unet.train()
            samples.append(AttackSamples(f"k={k}", images, list(target.prompts)))
        bar.close()
        del model
        return AttackOutput(samples, headline=f"k={self.steps[-1]}", details={"loss": losses})
