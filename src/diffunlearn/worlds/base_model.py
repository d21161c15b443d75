"""Recipe for the digit world's base model: build and train it from scratch (``world train-base``).

Stable Diffusion's shape at toy size: a ``UNet2DConditionModel`` with cross-attention on the token
states of a FROZEN pretrained text encoder (all-MiniLM-L6-v2, as SD freezes CLIP), plus a learned
attention-pooled text embedding added to the time embedding (``addition_embed_type="text"``), which
a probe found makes the digit word far easier to learn than cross-attention alone.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel

from ..core.checkpoints import load_recipe_checkpoint, read_recipe_state, save_recipe_checkpoint
from ..models.pixel import PixelTextToImage
from ..models.text import FrozenTextEncoder
from . import digits as world

UNET_CONFIG = dict(
    sample_size=world.IMAGE_SIZE, in_channels=3, out_channels=3, layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8, attention_head_dim=2, cross_attention_dim=384,
    addition_embed_type="text", addition_embed_type_num_heads=4,
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")

# Sampling settings of the world, chosen on TRAIN prompts (see README): used by the demo and eval.
SAMPLE_STEPS = 12
GUIDANCE = 4.0


def build_base(seed: int = 0, text_encoder: FrozenTextEncoder | None = None) -> PixelTextToImage:
    """An untrained base model with the world's architecture (deterministic for ``seed``)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    return PixelTextToImage(unet, DDPMScheduler(**SCHEDULER_CONFIG), text_encoder)


def training_state(unet, lr: float, steps: int, warmup: int = 200):
    """The base-model recipe's optimisation state: EMA of the weights, AdamW, and linear warm-up
    followed by a cosine decay to 5% of ``lr`` (shared by the text and class-conditional recipes)."""
    ema = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True, power=0.75)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.475 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    return ema, opt, sched


@contextlib.contextmanager
def ema_weights(unet, ema):
    """Temporarily load the EMA weights into ``unet`` (to evaluate and save them), then restore."""
    backup = [p.detach().clone() for p in unet.parameters()]
    ema.copy_to(unet.parameters())
    try:
        yield
    finally:
        with torch.no_grad():
            for p, b in zip(unet.parameters(), backup):
                p.copy_(b)


def recipe_step(loss: torch.Tensor, unet, opt, sched, ema) -> None:
    """One step of the base-model recipes (text and class): backward, clip to norm 1, Adam, the LR
    schedule, the EMA of the weights."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    sched.step()
    ema.step(unet.parameters())


def report(entry: dict, bar) -> None:
    """An evaluation line during training, on stderr above the bar (stdout gets only the final JSON)."""
    bar.write(json.dumps(entry), file=sys.stderr)


class RecipeCheckpoints:
    """Checkpoints, resume and clean-up of a base-model recipe (shared by the text and class recipes):
    the whole state every ``every`` steps into ``out/checkpoint``, removed when training finishes."""

    def __init__(self, out: Path, track: str, args: dict, every: int, unet, ema, opt, sched, gen) -> None:
        self.out, self.track, self.args, self.every = out, track, args, every
        self.state = (unet, ema, opt, sched, gen)
        self.started = time.time()

    def start(self, resume: bool, steps: int) -> tuple[list[dict], int]:
        """(the evaluation log so far, the first step to run); restores the checkpoint when resuming."""
        ckpt = read_recipe_state(self.out) if resume else None
        if ckpt is None:
            return [], 1
        ckpt = load_recipe_checkpoint(self.out, *self.state)
        self.started = time.time() - ckpt["minutes"] * 60
        print(f"resuming from the checkpoint of step {ckpt['step']} in {self.out / 'checkpoint'}; continuing at "
              f"step {ckpt['step'] + 1} of {steps}", file=sys.stderr)
        return ckpt["log"], ckpt["step"] + 1

    def minutes(self) -> float:
        return (time.time() - self.started) / 60

    def after_step(self, step: int, steps: int, log: list[dict]) -> None:
        if self.every and step % self.every == 0 and step < steps:
            save_recipe_checkpoint(self.out, step, *self.state, {"args": self.args, "log": log,
                                                                 "minutes": self.minutes(), "track": self.track})

    def finish(self, bar) -> None:
        bar.close()
        shutil.rmtree(self.out / "checkpoint", ignore_errors=True)  # the model and training.json are the result


def train_base(out: Path, steps: int = 5000, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
               pool_size: int = 8192, uncond_prob: float = 0.1, eval_every: int = 1000,
               init: Path | None = None, progress: bool = True, exclude: str | None = None,
               checkpoint_every: int = 250, resume: bool = False, eval_prompts: int = 500) -> dict:
    """Train the base model on fresh renders of random train-vocabulary captions.

    Captions come from a fixed pool encoded once (the encoder is frozen); every step renders new
    images for them, so images never repeat. Writes EMA weights to ``out`` at every evaluation and
    returns the last evaluation (oracle accuracy on held-out test-vocabulary prompts). ``init``
    continues from the UNet of an earlier model folder instead of a fresh initialisation.

    ``exclude`` (a digit or colour word) trains the gold standard of exact unlearning: the same
    recipe on a world in which that concept never appears: no caption requests it and no random
    draw renders it, so the model never sees it (the text encoder still knows the word).

    Every ``checkpoint_every`` steps the whole training state goes to ``out/checkpoint``;
    ``resume`` continues from it to the same weights an uninterrupted run reaches (the checkpoint
    is removed when training finishes).
    """
    from tqdm.auto import tqdm

    from ..evaluate.attributes import alignment_scores, sample_and_read
    from .oracle import load_oracle

    out = Path(out)
    args = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "pool_size": pool_size,
            "uncond_prob": uncond_prob, "init": str(init) if init else None, "exclude": exclude}
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_base(seed)
    if init is not None:
        model.unet = UNet2DConditionModel.from_pretrained(Path(init) / "unet", use_safetensors=True)
    unet = model.unet
    captions = []
    while len(captions) < pool_size:
        caption = world.random_caption(rng, "train")
        if not exclude or exclude not in _requested_words(caption):
            captions.append(caption)
    # The frozen encoder's pass over the caption pool is most of the setup time: show it.
    chunk = 512
    parts = [model.text_encoder.encode([c.text for c in captions[i:i + chunk]])
             for i in tqdm(range(0, pool_size, chunk), desc="train-base: encode captions", disable=not progress)]
    states, mask = torch.cat([p[0] for p in parts]).half(), torch.cat([p[1] for p in parts])
    del parts
    null_states, null_mask = model.text_encoder.encode([""])
    model.text_encoder._cache.clear()
    ema, opt, sched = training_state(unet, lr, steps)
    oracle = load_oracle()
    test_rng = random.Random(12345)
    test_caps = [world.random_caption(test_rng, "test", omit_prob=0.15) for _ in range(eval_prompts)]
    ckpts = RecipeCheckpoints(out, "text", args, checkpoint_every, unet, ema, opt, sched, gen)
    log, first = ckpts.start(resume, steps)
    unet.train()
    bar = tqdm(range(first, steps + 1), desc="train-base", disable=not progress, initial=first - 1, total=steps)
    for step in bar:
        idx = torch.randint(pool_size, (batch_size,), generator=gen)
        batch_caps = [captions[i] for i in idx.tolist()]
        x0, _ = world.render_captions(batch_caps, gen, split="train", exclude=exclude)
        cond_s, cond_m = states[idx].float(), mask[idx]
        drop = torch.rand(batch_size, generator=gen) < uncond_prob
        cond_s[drop] = null_states[0]
        cond_m[drop] = null_mask[0]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(model.num_train_timesteps, (batch_size,), generator=gen)
        x_t = model.add_noise(x0, noise, t)
        pred = unet(x_t, t, encoder_hidden_states=cond_s, encoder_attention_mask=cond_m).sample
        loss = F.mse_loss(pred, noise)
        recipe_step(loss, unet, opt, sched, ema)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % eval_every == 0 or step == steps:
            with ema_weights(unet, ema):
                _, pred_attr = sample_and_read(model, oracle, test_caps, seed=0, steps=SAMPLE_STEPS, guidance=GUIDANCE)
                scores = alignment_scores(pred_attr, test_caps)
                entry = {"step": step, "loss": loss.item(), "minutes": ckpts.minutes(), **scores}
                log.append(entry)
                report(entry, bar)
                model.save(out)
                (out / "training.json").write_text(json.dumps({
                    "recipe": "diffunlearn.worlds.base_model.train_base", "args": args,
                    "evaluations": log}, indent=2) + "\n")
        ckpts.after_step(step, steps, log)
    ckpts.finish(bar)
    return log[-1]


def _requested_words(caption: world.Caption) -> set[str]:
    """The attribute values (words) a caption requests."""
    return {world.VALUES[a][v] for a, v in caption.requested().items()}


def check_base(model: str, n: int = 1000, guidance: float | None = None, split: str = "test", seed: int = 0,
               progress: bool = True) -> dict:
    """Oracle accuracy of a model's samples on ``n`` random prompts of ``split`` (the ≥85% target).

    Returns per-attribute accuracy over the captions that request the attribute, and ``all``.
    """
    from ..evaluate.attributes import alignment_scores, sample_and_read
    from ..models import load_adapter
    from .oracle import load_oracle

    adapter, _ = load_adapter(model)
    rng = random.Random(f"check:{split}:{seed}")
    caps = [world.random_caption(rng, split) for _ in range(n)]
    g = GUIDANCE if guidance is None else guidance
    _, pred = sample_and_read(adapter, load_oracle(), caps, seed=seed, steps=SAMPLE_STEPS, guidance=g,
                              progress=progress)
    return {"split": split, "n": n, "guidance": g, "steps": SAMPLE_STEPS, **alignment_scores(pred, caps)}
