"""The digit world's oracle: a small CNN that reads digit, colour and background from an image.

It is trained on ground-truth renders only (never on model samples) and is used only to evaluate,
never inside a training loss. Its penultimate features are the feature space of the world's
Fréchet distance (the analogue of Inception features for FID).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from . import digits as world

FEATURE_DIM = 64


class Oracle(nn.Module):
    """Three-headed CNN on ``(N, 3, 16, 16)`` images in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.GELU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, FEATURE_DIM), nn.GELU(),
        )
        self.heads = nn.ModuleDict({
            "digit": nn.Linear(FEATURE_DIM, len(world.DIGITS)),
            "colour": nn.Linear(FEATURE_DIM, len(world.COLOURS)),
            "background": nn.Linear(FEATURE_DIM, len(world.BACKGROUNDS)),
        })

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, 16, 16)`` in [-1, 1] -> ``(N, FEATURE_DIM)``."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute: ``{"digit": (N, 10), "colour": (N, 5), "background": (N, 3)}``."""
        h = self.features(images)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Predicted attribute indices, ``(N, 3)`` long in the order digit, colour, background."""
        self.eval()
        out = []
        for i in range(0, len(images), batch_size):
            logits = self(images[i:i + batch_size])
            out.append(torch.stack([logits[a].argmax(-1) for a in world.ATTRIBUTES], dim=1))
        return torch.cat(out)


class OracleFeatures(nn.Module):
    """The oracle's features as a torchmetrics FID/KID feature module.

    torchmetrics passes uint8 images ``(N, 3, H, W)``; any size is resized to the world's 16x16.
    """

    def __init__(self, oracle: Oracle) -> None:
        super().__init__()
        self.oracle = oracle
        self.num_features = FEATURE_DIM

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()
        if x.shape[-1] != world.IMAGE_SIZE:
            x = F.interpolate(x, size=(world.IMAGE_SIZE, world.IMAGE_SIZE), mode="bilinear", align_corners=False)
        return self.oracle.features(x).double()


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noise and slight blur so the oracle also reads imperfect samples of a generative model."""
    noise = torch.randn(images.shape, generator=generator) * torch.rand(len(images), 1, 1, 1, generator=generator) * 0.2
    blur = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    mix = (torch.rand(len(images), 1, 1, 1, generator=generator) < 0.3).float() * 0.5
    return (images * (1 - mix) + blur * mix + noise).clamp(-1, 1)


def train_oracle(steps: int = 4000, batch_size: int = 256, seed: int = 0, progress: bool = True) -> Oracle:
    """Train the oracle on fresh ground-truth renders from the TRAIN glyph split."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Oracle()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    for _ in tqdm(range(steps), desc="oracle", disable=not progress):
        none = [None] * batch_size
        images, labels = world.render(none, none, none, gen, split="train")
        logits = model(_augment(images, gen))
        loss = sum(F.cross_entropy(logits[a], labels[:, j]) for j, a in enumerate(world.ATTRIBUTES))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def heldout_accuracy(model: Oracle, n: int = 3000, seed: int = 99) -> dict[str, float]:
    """Per-attribute accuracy on renders of the held-out TEST glyphs."""
    gen = torch.Generator().manual_seed(seed)
    none = [None] * n
    images, labels = world.render(none, none, none, gen, split="test")
    pred = model.predict(images)
    return {a: float((pred[:, j] == labels[:, j]).float().mean()) for j, a in enumerate(world.ATTRIBUTES)}


def save_oracle(model: Oracle, path: str | os.PathLike) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def load_oracle(path: str | os.PathLike | None = None) -> Oracle:
    """Load the committed oracle (or one at ``path``) from safetensors."""
    from .assets import asset_path

    path = Path(path) if path is not None else asset_path("oracle.safetensors")
    model = Oracle()
    model.load_state_dict(load_file(str(path)))
    return model.eval()
