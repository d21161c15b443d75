"""Class-conditional pixel-space model: a diffusers ``UNet2DModel`` whose class label enters through
``num_class_embeds`` (an ``nn.Embedding`` added to the time embedding), a DDPM scheduler for training
and DDIM for sampling. This is the paper's CIFAR-10 setting: forget one class of a class-conditional
DDPM.

A "prompt" here is a class name (or its index as a decimal string); ``encode_prompts`` turns prompts
into a ``LongTensor`` of labels, which is the condition every method and the training loop pass
around (a tensor can be indexed by rows and moved with ``.to``, as the protocol needs).

Classifier-free guidance needs an unconditional prediction. The classifier-free DDPM convention
reserves one extra embedding row for "no class": a UNet with ``num_class_embeds = K + 1`` for ``K``
named classes has the null class ``K``, which the empty prompt ``""`` selects. A UNet with exactly
``K`` rows has no null class; it is sampled without guidance.

The folder layout is diffusers' (``model_index.json``, ``unet/``, ``scheduler/``), so a
class-conditional ``DDPMPipeline`` folder loads here too, and ours loads with
``UNet2DModel.from_pretrained(folder, subfolder="unet")``. Class names live in ``model_index.json``
under ``_diffunlearn_classes`` (diffusers ignores keys starting with ``_``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from torch import nn

from ..errors import UserError
from ..families import EMBEDDED_CLASS
from .pixel_base import PixelSpaceAdapter, sampling


def build_class_unet(num_classes: int, sample_size: int = 16, channels: int = 3,
                     block_out_channels: Sequence[int] = (32, 64, 64), layers_per_block: int = 1,
                     seed: int = 0) -> UNet2DModel:
    """A freshly initialised class-conditional ``UNet2DModel`` (about 1.2 M parameters at the defaults).

    It has ``num_classes + 1`` class embeddings: the last index is the null class that
    classifier-free guidance uses. The first resolution has plain ResNet blocks, the lower ones
    self-attention too. Initialisation uses ``seed`` inside ``torch.random.fork_rng``, so the global
    RNG is left as it was.

    Raises:
        UserError: ``num_classes`` below 1, or no block sizes.
    """
    if num_classes < 1:
        raise UserError(f"a class-conditional model needs at least one class, got num_classes={num_classes}")
    block_out_channels = tuple(int(c) for c in block_out_channels)
    if not block_out_channels:
        raise UserError("block_out_channels must name at least one block size, e.g. (32, 64, 64)")
    n = len(block_out_channels)
    common = math.gcd(*block_out_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(
            sample_size=sample_size, in_channels=channels, out_channels=channels,
            block_out_channels=block_out_channels, layers_per_block=layers_per_block,
            down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * (n - 1),
            up_block_types=("AttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
            # GroupNorm groups and attention head width must divide every block's channel count.
            norm_num_groups=math.gcd(common, 8), attention_head_dim=min(32, common),
            num_class_embeds=num_classes + 1)


def _normalise(name: str) -> str:
    return name.strip().casefold()


def _checked_names(class_names: Sequence[str]) -> tuple[str, ...]:
    names = tuple(str(n) for n in class_names)
    if any(not _normalise(n) for n in names):
        raise UserError(f"class names must be non-empty (\"\" is the null class), got {list(names)}")
    if len({_normalise(n) for n in names}) != len(names):
        raise UserError(f"class names must differ ignoring case and surrounding spaces, got {list(names)}")
    return names


class ClassConditionalAdapter(PixelSpaceAdapter):
    """Adapter for a class-conditional ``UNet2DModel`` (implements ``DiffusionAdapter``).

    Attributes:
        unet, scheduler: the diffusers model and its (training) DDPM scheduler.
        class_names: the ``K`` class names; prompt ``class_names[i]`` is label ``i``.
        null_class: ``K`` when the UNet has the extra "no class" embedding, else ``None``.
        num_train_timesteps: ``T`` of the training scheduler.
        image_size: ``unet.config.sample_size``; ``channels``: ``unet.config.in_channels``.
        sampler_name: the solver ``sample`` uses (recorded in data and evaluation manifests).
    """

    sampler_name = "DDIMScheduler"
    family = "class"
    condition_kind = "class"
    save_formats = ("class",)
    sampler_defaults = (50, 1.0)  # DDIM 50 steps, no guidance (the CIFAR-10 reference; config.CLASS_DEFAULTS)

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler, class_names: Sequence[str]) -> None:
        """Raises:
            UserError: the UNet is not class-conditional, its embedding count fits neither ``K`` nor
                ``K + 1`` for the ``K`` class names, a class name is empty or repeated, or the
                scheduler's prediction type is unknown.
        """
        embeds = unet.config.get("num_class_embeds")
        if embeds is None or unet.config.get("class_embed_type") is not None:
            raise UserError("this UNet2DModel is not class-conditional (its config has no num_class_embeds); "
                            "use a text-conditioned model folder, or a UNet built with num_class_embeds")
        names = _checked_names(class_names)
        if embeds == len(names) + 1:
            self.null_class: int | None = len(names)
        elif embeds == len(names):
            self.null_class = None
        else:
            raise UserError(f"the UNet has {embeds} class embeddings but {len(names)} class names were given; "
                            f"pass {embeds} names (no null class) or {embeds - 1} (the last embedding is the "
                            "null class)")
        super().__init__(unet, scheduler)  # checks the prediction type
        self.class_names = names
        self.image_size = unet.config.sample_size
        self.channels = int(unet.config.in_channels)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The ``K`` class names; prompt ``class_names[i]`` encodes to label ``i``."""
        return self._class_names

    @class_names.setter
    def class_names(self, names: Sequence[str]) -> None:
        """Rename the classes (e.g. a plain DDPM folder's "0".."K-1" to a data set's names); the count
        is fixed by the UNet's embeddings.

        Raises:
            UserError: a different number of names, or empty/repeated names.
        """
        names = _checked_names(names)
        current = getattr(self, "_class_names", None)
        if current is not None and len(names) != len(current):
            raise UserError(f"this model has {len(current)} classes, so it needs {len(current)} class names, "
                            f"got {len(names)}")
        self._class_names = names
        self._lookup = {_normalise(n): i for i, n in enumerate(names)}

    @property
    def _height_width(self) -> tuple[int, int]:
        size = self.image_size
        return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))

    # ---- loading and saving -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> ClassConditionalAdapter:
        """Load ``folder/unet`` and ``folder/scheduler`` with diffusers' ``from_pretrained``.

        The scheduler is read as a ``DDPMScheduler`` whatever class saved it (a DDIM config gives
        the same betas; training needs DDPM's ᾱ_t). Class names come from ``model_index.json``'s
        ``_diffunlearn_classes``; without them the classes are named ``"0"``..``"K-1"``, where
        ``K = num_class_embeds`` unless ``_diffunlearn_null_class`` is true (then the last
        embedding is the null class and ``K = num_class_embeds - 1``).

        Raises:
            UserError: the folder is missing, incomplete or corrupt, or not class-conditional.
        """
        folder = Path(folder)
        unet, scheduler = cls.load_parts(folder, UNet2DModel, DDPMScheduler, "a class-conditional model folder")
        index: dict = {}
        index_path = folder / "model_index.json"
        if index_path.is_file():
            try:
                index = json.loads(index_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise UserError(f"{index_path} is corrupt (not JSON); restore or rebuild that model folder") from exc
            if not isinstance(index, dict):
                raise UserError(f"{index_path} is not a JSON object; restore or rebuild that model folder")
        embeds = unet.config.get("num_class_embeds")
        if embeds is None:
            raise UserError(f"the UNet in {folder} is not class-conditional (no num_class_embeds); "
                            "load it as a text-conditioned model instead")
        null_flag = index.get("_diffunlearn_null_class")
        names = index.get("_diffunlearn_classes")
        if names is not None:
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise UserError(f"{index_path}: _diffunlearn_classes must be a list of class names; "
                                "restore or rebuild that model folder")
            if isinstance(null_flag, bool) and null_flag != (embeds == len(names) + 1):
                raise UserError(f"{index_path} says null class {null_flag} but the UNet has {embeds} embeddings for "
                                f"{len(names)} classes; restore or rebuild that model folder")
        else:
            count = embeds - 1 if null_flag is True else embeds
            names = [str(i) for i in range(count)]
        return cls(unet, scheduler, names)

    def save(self, folder: str | os.PathLike) -> None:
        """Write ``unet/`` (safetensors), ``scheduler/`` and ``model_index.json`` (with the class names)."""
        self.save_parts(folder, {
            "_class_name": "ClassConditionalUNet",
            "_diffunlearn_adapter": "class",
            "unet": ["diffusers", "UNet2DModel"],
            "scheduler": ["diffusers", type(self.scheduler).__name__],
            "_diffunlearn_classes": list(self.class_names),
            "_diffunlearn_null_class": self.null_class is not None,
        })

    # ---- the protocol -------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Class labels ``(N,)`` (int64) for prompts that are class names (ignoring case and surrounding
        spaces), decimal class indices ``"0"``..``"K-1"``, or ``""`` for the null class. A name wins
        over an index when both could match.

        Raises:
            UserError: an unknown prompt, or ``""`` for a model without a null class.
        """
        labels = []
        for prompt in prompts:
            key = _normalise(str(prompt))
            if key in self._lookup:
                labels.append(self._lookup[key])
            elif key == "":
                if self.null_class is None:
                    raise UserError("this model has no null class, so the empty prompt cannot be encoded; "
                                    f"use one of the classes: {', '.join(self.class_names)}")
                labels.append(self.null_class)
            elif key.isascii() and key.isdecimal() and int(key) < len(self.class_names):
                labels.append(int(key))
            else:
                raise UserError(f"unknown class {prompt!r}; this model's classes are: {', '.join(self.class_names)} "
                                f"(or their indices 0-{len(self.class_names) - 1})")
        return torch.tensor(labels, dtype=torch.long)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images unchanged (the UNet denoises pixels).

        Raises:
            UserError: images are not ``(N, channels, H, W)`` at the UNet's size.
        """
        height, width = self._height_width
        if images.ndim != 4 or images.shape[1] != self.channels or tuple(images.shape[2:]) != (height, width):
            raise UserError(f"images of shape {tuple(images.shape)} do not fit this model, which takes "
                            f"(N, {self.channels}, {height}, {width}); resize or convert them first")
        return images

    def predict_noise(self, x_t: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """The UNet's output for ``x_t`` given class labels ``condition`` ``(N,)`` (ε for epsilon models).

        A floating-point ``condition`` ``(N, D)`` is taken as class-embedding VECTORS instead of labels
        (the embedding attack optimises them): the UNet's embedding table is bypassed for this call.
        """
        device = self.device
        x_t, timesteps = x_t.to(device), timesteps.to(device)
        if not condition.is_floating_point():
            return self.unet(x_t, timesteps, class_labels=condition.to(device)).sample
        table = self.unet.class_embedding
        self.unet.class_embedding = nn.Identity()  # diffusers adds class_embedding(class_labels) to the time embedding
        try:
            return self.unet(x_t, timesteps, class_labels=condition.to(device, x_t.dtype)).sample
        finally:
            self.unet.class_embedding = table

    # ---- what the red-team attacks need (diffunlearn.attacks) ----------------------------------
    def condition_tensors(self, condition: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Labels -> their class-embedding vectors ``(N, D)``, the continuous condition an attack optimises."""
        if condition.is_floating_point():
            return (condition,)
        with torch.no_grad():
            return (self.unet.class_embedding(condition.to(self.unet.class_embedding.weight.device)).float(),)

    def make_condition(self, vectors: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`condition_tensors`: vectors are a condition ``predict_noise`` accepts."""
        return vectors

    def trainable_parameters(self, selection: str) -> list[tuple[str, nn.Parameter]]:
        """``full`` and ``non-cross-attention`` both train every UNet weight: a ``UNet2DModel`` has no
        cross-attention (the class enters through an embedding added to the time embedding).

        Raises:
            UserError: ``cross-attention`` or ``lora`` (not available for this model), or an unknown
                selection.
        """
        if selection in ("full", "non-cross-attention"):
            chosen = list(self.unet.named_parameters())
            for _, p in chosen:
                p.requires_grad_(True)
            return chosen
        if selection == "cross-attention":
            raise UserError("a class-conditional UNet has no cross-attention (the class is an embedding added to "
                            "the time embedding); use selection full or non-cross-attention")
        if selection == "lora":
            raise UserError("parameter selection 'lora' is available for Stable Diffusion models only; for a "
                            "class-conditional model use full or non-cross-attention")
        raise UserError(f"unknown parameter selection {selection!r}; for a class-conditional model use full or "
                        "non-cross-attention")

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], steps: int = 50, guidance: float = 1.0,
               batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """Deterministic DDIM sampling (η = 0, ``steps`` model calls per image, two with guidance).

        With ``guidance != 1`` and a null class, classifier-free guidance ε_u + g·(ε_c − ε_u) with the
        null class as the unconditional label. A model without a null class ignores ``guidance``
        (plain conditional sampling).

        Image i starts from noise drawn with ``torch.Generator().manual_seed(seeds[i])``: the image
        depends on its own prompt and seed only (not on batch size or neighbours), and the same
        seeds give every model the same start, so grids before and after unlearning line up.

        Returns:
            ``(N, channels, H, W)`` float32 on the CPU (wherever the UNet runs), clamped to [-1, 1].

        Raises:
            ValueError: seeds and prompts differ in number, or a non-positive ``steps``/``batch_size``.
            UserError: an unknown class prompt.
        """
        if len(seeds) != len(prompts):
            raise ValueError(f"need one seed per prompt, got {len(seeds)} seeds for {len(prompts)} prompts")
        labels = self.encode_prompts(prompts)  # unknown classes fail before any compute
        return self.sample_condition(labels, seeds, steps, guidance, batch_size, progress)

    @torch.no_grad()
    def sample_condition(self, condition: torch.Tensor, seeds: Sequence[int], steps: int = 50,
                         guidance: float = 1.0, batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """:meth:`sample` from labels ``(N,)`` or class-embedding vectors ``(N, D)`` (an attacked condition)."""
        if len(seeds) != len(condition):
            raise ValueError(f"need one seed per condition row, got {len(seeds)} seeds for {len(condition)} rows")
        if steps < 1 or batch_size < 1:
            raise ValueError(f"`steps` and `batch_size` must be positive, got {steps} and {batch_size}")
        device = self.device
        height, width = self._height_width
        noise = self.initial_noise(seeds, (self.channels, height, width))
        solver = DDIMScheduler.from_config(self.scheduler.config)
        guided = guidance != 1 and self.null_class is not None
        vectors = condition.is_floating_point()
        if guided:
            null = torch.tensor([self.null_class], device=device)
            null = self.condition_tensors(null)[0] if vectors else null
        out = []
        with sampling(self.unet, len(seeds), progress) as bar:
            for start in range(0, len(seeds), batch_size):
                cond = condition[start:start + batch_size].to(device)
                n = len(cond)
                x = noise[start:start + batch_size].to(device)
                if guided:
                    both = torch.cat([null.expand(n, *null.shape[1:]), cond])
                solver.set_timesteps(steps)
                for t in solver.timesteps:
                    if guided:
                        e_u, e_c = self.predict_noise(torch.cat([x, x]), t.repeat(2 * n).to(device), both).chunk(2)
                        eps = e_u + guidance * (e_c - e_u)
                    else:
                        eps = self.predict_noise(x, t.repeat(n).to(device), cond)
                    x = solver.step(eps, t, x, eta=0.0).prev_sample
                out.append(x.float().clamp(-1, 1).cpu())
                bar.update(n)
        return torch.cat(out)


__all__ = ["EMBEDDED_CLASS", "ClassConditionalAdapter", "build_class_unet"]
