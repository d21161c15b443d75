"""FID and KID of generated images against a folder of real images, in a chosen feature space.

The paper reports FID against the training set for class-wise unlearning (PAPER.md §4). The maths
is torchmetrics' (``FrechetInceptionDistance``, ``KernelInceptionDistance``); we only choose the
features and cache the reference side:

* ``feature="clip"``: projected (unnormalised) CLIP image embeddings of ``options.clip_model``, the
  "FID_CLIP" of Kynkäänniemi et al. 2023 and clean-fid's ``clip_vit_b_32`` mode; works offline;
* ``feature="oracle"``: the digit world's oracle features (``worlds/oracle.py``);
* ``feature="inception"``: the standard pool3 Inception-v3 features, which need torch-fidelity (and
  its weights download), hence an optional extra.

Both sides go through the same pixels: generated images are quantised to uint8 exactly as saving
them as PNG would, and reference images are read as uint8 and resized to the generated images' size
(centre crop to the same aspect ratio, then bicubic resize with PIL), so only content differs.

Reference features are computed once per (image folder content, feature extractor, image size) and
cached as safetensors under ``options.cache_dir/reference-features``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from .base import MetricOptions, MetricResult, check_inputs

FEATURES: tuple[str, ...] = ("clip", "oracle", "inception")
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")
KID_SUBSETS = 100            # torchmetrics' default number of KID subsets
KID_SEED = 0                 # KID draws its subsets with torch.randperm; seeded so a run is reproducible
CACHE_FOLDER = "reference-features"


# ---------------------------------------------------------------------------------------------------------------------
# Feature spaces


class FeatureSpace(Protocol):
    """A feature extractor for FID/KID: uint8 ``(N, 3, H, W)`` images -> ``(N, num_features)`` float64.

    ``name`` identifies the extractor AND its weights; it is part of the reference-cache key.
    """

    name: str
    num_features: int

    def settings(self) -> dict[str, Any]: ...

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def weights_fingerprint(module: nn.Module) -> str:
    """16 hex digits identifying a module's weights: names, shapes and a strided sample of the values.

    Sampling every 997th element of each tensor keeps this fast for a 150 M-parameter CLIP while any
    fine-tuning (which changes almost every weight) still changes the fingerprint.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)[::997].float().cpu().contiguous()
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(flat.numpy().tobytes())
    return h.hexdigest()[:16]


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]; float input is assumed to be in [-1, 1] already."""
    return images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()


class ClipFeatureSpace:
    """Projected CLIP image embeddings (not L2-normalised) of ``clip_model``."""

    def __init__(self, clip_model: str, device: str, batch_size: int) -> None:
        from .clip import load_clip

        self.clip_model = clip_model
        self.clip = load_clip(clip_model, device)
        self.batch_size = batch_size
        self.num_features = int(self.clip.model.config.projection_dim)
        self.name = f"clip:{weights_fingerprint(self.clip.model)}"

    def settings(self) -> dict[str, Any]:
        return {"feature_extractor": "CLIP image embedding (projected, unnormalised)",
                "feature_weights": self.name, **self.clip.settings(self.clip_model)}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.image_features(_to_unit(images), self.batch_size).double()


class OracleFeatureSpace:
    """The digit world's oracle penultimate features (64-d), the world's analogue of Inception."""

    def __init__(self, device: str) -> None:
        from ..worlds.oracle import OracleFeatures, load_oracle

        oracle = load_oracle()
        self.module = OracleFeatures(oracle).to(device).eval()
        self.device = device
        self.num_features = int(self.module.num_features)
        self.name = f"oracle:{weights_fingerprint(oracle)}"

    def settings(self) -> dict[str, Any]:
        return {"feature_extractor": "digit-world oracle features", "feature_weights": self.name}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images.to(self.device)).double().cpu()


def _torch_fidelity_available() -> bool:
    return importlib.util.find_spec("torch_fidelity") is not None


class InceptionFeatureSpace:
    """torchmetrics' FID Inception-v3 (torch-fidelity's ``inception-v3-compat``) pool3 features, 2048-d."""

    def __init__(self, device: str) -> None:
        require_torch_fidelity()
        from torchmetrics.image.fid import NoTrainInceptionV3

        try:
            self.module = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"]).to(device)
        except Exception as e:  # torch-fidelity downloads its weights on first use
            raise UserError("cannot load the Inception-v3 weights of torch-fidelity (they download on first use); "
                            "run once with network or use --feature clip") from e
        self.device = device
        self.num_features = 2048
        self.name = "inception-v3-compat:2048"

    def settings(self) -> dict[str, Any]:
        return {"feature_extractor": "Inception-v3 pool3 (torch-fidelity inception-v3-compat)",
                "feature_weights": self.name}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images.to(self.device)).double().cpu()


def require_torch_fidelity() -> None:
    """Raise a ``UserError`` unless torch-fidelity (the Inception features) is importable."""
    if not _torch_fidelity_available():
        raise UserError("the inception feature needs torch-fidelity: install the `inception` extra "
                        "(pip install torch-fidelity) or use --feature clip")


def build_feature_space(options: MetricOptions) -> FeatureSpace:
    """The feature space ``options.feature`` names (loads its model).

    Raises:
        UserError: unknown feature, missing CLIP model, missing torch-fidelity.
    """
    if options.feature == "clip":
        return ClipFeatureSpace(options.clip_model, options.device, options.batch_size)
    if options.feature == "oracle":
        return OracleFeatureSpace(options.device)
    if options.feature == "inception":
        return InceptionFeatureSpace(options.device)
    raise UserError(f"unknown feature {options.feature!r} for fid/kid; use one of: {', '.join(FEATURES)}")


class _Precomputed(nn.Module):
    """A torchmetrics feature module that passes precomputed ``(N, D)`` features through.

    We extract features ourselves (so the reference side can be cached) and still let torchmetrics
    do the statistics: it only needs a module with an int ``num_features`` that maps its input to
    ``(N, D)`` features.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.double()


# ---------------------------------------------------------------------------------------------------------------------
# Reference images


def quantize(images: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` float in [-1, 1] -> uint8 in [0, 255], the pixels a PNG of the image holds."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def reference_files(folder: str | os.PathLike) -> list[Path]:
    """The PNG/JPEG files under ``folder`` (recursively), sorted by relative path.

    Raises:
        UserError: the folder is not given, does not exist or holds no PNG/JPEG image.
    """
    if not str(folder):
        raise UserError("fid/kid need real images to compare with; pass --reference FOLDER (PNG or JPEG files)")
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"the reference folder {root} does not exist; pass a folder of PNG or JPEG images")
    files = sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise UserError(f"the reference folder {root} holds no PNG or JPEG image; pass a folder of real images")
    return files


def content_hash(files: list[Path], root: str | os.PathLike) -> str:
    """SHA-256 (16 hex digits) over the relative paths and bytes of ``files`` under ``root``."""
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


def load_reference_images(files: list[Path], size: tuple[int, int]) -> torch.Tensor:
    """Read images as RGB uint8 and bring them to ``size = (H, W)``: ``(len(files), 3, H, W)`` uint8.

    Each image is centre-cropped to the aspect ratio of ``size`` (so nothing is stretched) and then
    resized with PIL's bicubic filter.
    """
    from PIL import Image, UnidentifiedImageError

    height, width = size
    out = np.empty((len(files), height, width, 3), dtype=np.uint8)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as opened:
                im = opened.convert("RGB")  # decodes now, so a truncated file fails here
        except (OSError, UnidentifiedImageError) as e:
            raise UserError(f"cannot read the reference image {path}; remove or replace it") from e
        w, h = im.size
        if w * height != h * width:
            if w * height > h * width:  # too wide: keep the full height
                cw, ch = round(h * width / height), h
            else:
                cw, ch = w, round(w * height / width)
            left, top = (w - cw) // 2, (h - ch) // 2
            im = im.crop((left, top, left + cw, top + ch))
        if im.size != (width, height):
            im = im.resize((width, height), Image.Resampling.BICUBIC)
        out[i] = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


class MemoryReference:
    """Real images held in memory (``MetricOptions.reference_images``), with the interface of
    :class:`ReferenceFeatures`: quantised to uint8 as a PNG of them would be, at the generated size,
    features computed once per feature extractor, never cached on disk."""

    def __init__(self, images: torch.Tensor, batch_size: int) -> None:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError("reference_images must be a (N, 3, H, W) tensor in [-1, 1]")
        self.pixels = quantize(images)
        self.folder = f"in memory ({len(images)} images)"
        self.count = len(images)
        self.batch_size = batch_size
        self.content_hash = hashlib.sha256(self.pixels.numpy().tobytes()).hexdigest()[:16]
        self.last_cache_path = ""
        self._memory: dict[tuple[str, tuple[int, int]], torch.Tensor] = {}

    def features(self, space: FeatureSpace, size: tuple[int, int]) -> torch.Tensor:
        key = (space.name, size)
        if key not in self._memory:
            pixels = self.pixels
            if tuple(pixels.shape[-2:]) != tuple(size):
                raise ValueError(f"reference images of size {tuple(pixels.shape[-2:])} for generated images of size "
                                 f"{tuple(size)}: render the references at the generated size")
            self._memory[key] = torch.cat([space(pixels[i:i + self.batch_size]).double().cpu()
                                           for i in range(0, len(pixels), self.batch_size)])
        return self._memory[key]


class ReferenceFeatures:
    """Features of a reference folder, computed once per (content, feature extractor, size) and cached.

    The disk cache is ``cache_dir/reference-features/<key>.safetensors`` with key = SHA-256 of the
    folder's content hash, the feature space's ``name`` and the size; ``cache_dir=""`` keeps the
    features in memory only (for the lifetime of this object).
    """

    def __init__(self, folder: str, cache_dir: str, batch_size: int) -> None:
        self.folder = folder
        self.files = reference_files(folder)  # fail early on a bad folder, before any image is generated
        self.count = len(self.files)
        self.cache_dir = cache_dir
        self.batch_size = batch_size
        self._hash: str | None = None
        self._memory: dict[str, torch.Tensor] = {}
        self.last_cache_path: str = ""

    @property
    def content_hash(self) -> str:
        if self._hash is None:
            self._hash = content_hash(self.files, self.folder)
        return self._hash

    def key(self, space: FeatureSpace, size: tuple[int, int]) -> str:
        text = f"{self.content_hash}|{space.name}|{size[0]}x{size[1]}"
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def features(self, space: FeatureSpace, size: tuple[int, int]) -> torch.Tensor:
        """``(n_reference, space.num_features)`` float64 features of the folder at ``size = (H, W)``."""
        from safetensors.torch import load_file, save_file

        key = self.key(space, size)
        if key in self._memory:
            return self._memory[key]
        path = Path(self.cache_dir) / CACHE_FOLDER / f"{key}.safetensors" if self.cache_dir else None
        feats = None
        if path is not None and path.is_file():
            try:
                feats = load_file(str(path))["features"]
            except Exception:  # a truncated or foreign file: recompute and overwrite it
                feats = None
            if feats is not None and feats.shape != (len(self.files), space.num_features):
                feats = None
        if feats is None:
            chunks = []
            for i in range(0, len(self.files), self.batch_size):
                # Looked up on the module at call time so tests can count calls by monkeypatching it.
                images = load_reference_images(self.files[i:i + self.batch_size], size)
                chunks.append(space(images).double().cpu())
            feats = torch.cat(chunks)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
                save_file({"features": feats.contiguous()}, str(tmp),
                          metadata={"folder": str(self.folder), "content_sha256": self.content_hash,
                                    "feature": space.name, "size": f"{size[0]}x{size[1]}",
                                    "images": str(len(self.files))})
                os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
        self.last_cache_path = str(path) if path is not None else ""
        self._memory[key] = feats
        return feats


# ---------------------------------------------------------------------------------------------------------------------
# Metrics


def frechet_distance_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """torchmetrics' FID between two feature sets ``(n_real, D)`` and ``(n_fake, D)``."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]), reset_real_features=True)
    fid.update(real.double(), real=True)
    fid.update(fake.double(), real=False)
    return float(fid.compute())


def kernel_distance_features(real: torch.Tensor, fake: torch.Tensor, subset_size: int,
                             subsets: int = KID_SUBSETS, seed: int = KID_SEED) -> tuple[float, float]:
    """torchmetrics' KID ``(mean, std)`` over ``subsets`` random subsets of ``subset_size`` features each.

    torchmetrics draws the subsets from the global RNG; we fork it and seed it so the result is
    reproducible and the caller's random stream is untouched.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
        kid = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=subset_size)
    kid.update(real.double(), real=True)
    kid.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = kid.compute()
    return float(mean), float(std)


class _DistanceMetric:
    """Shared part of FID and KID: options, feature space, reference features, settings."""

    name = ""

    def __init__(self, options: MetricOptions) -> None:
        if options.feature not in FEATURES:
            raise UserError(f"unknown feature {options.feature!r} for {self.name}; use one of: {', '.join(FEATURES)}")
        if options.feature == "inception":
            require_torch_fidelity()  # fail before any image is generated
        self.options = options
        self.reference: ReferenceFeatures | MemoryReference = (
            MemoryReference(options.reference_images, options.batch_size) if options.reference_images is not None
            else ReferenceFeatures(options.reference, options.cache_dir, options.batch_size))
        self._space: FeatureSpace | None = None
        self._last: dict[str, Any] = {}

    @property
    def space(self) -> FeatureSpace:
        if self._space is None:
            self._space = build_feature_space(self.options)
        return self._space

    def settings(self) -> dict[str, Any]:
        """Feature space and its weights, reference folder, its content hash and image count."""
        return {"feature": self.options.feature, **self.space.settings(), "reference": str(self.reference.folder),
                "reference_sha256": self.reference.content_hash, "reference_images": self.reference.count,
                "pixels": "generated images quantised to uint8; reference centre-cropped and bicubic-resized "
                          "to the generated size", **self._last}

    def _features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reference features, generated features) for ``(N, 3, H, W)`` images in [-1, 1]."""
        size = (int(images.shape[-2]), int(images.shape[-1]))
        real = self.reference.features(self.space, size)
        pixels = quantize(images)
        fake = torch.cat([self.space(pixels[i:i + self.options.batch_size])
                          for i in range(0, len(pixels), self.options.batch_size)]).double()
        self._last = {"image_size": list(size), "reference_cache": self.reference.last_cache_path}
        return real, fake


class FIDMetric(_DistanceMetric):
    """Fréchet distance between generated and reference images: ``aggregate = {"fid": value}``.

    Set-level: ``per_sample`` is empty. Needs at least 2 generated and 2 reference images (with
    fewer images than feature dimensions the covariances are singular and FID is biased upwards:
    compare numbers only at equal set sizes).
    """

    name = "fid"

    def score(self, images: torch.Tensor, prompts: list[str], set_name: str) -> MetricResult:
        """Score one set against the reference folder; ``set_name`` is ignored."""
        check_inputs(images, prompts)
        if len(images) < 2 or self.reference.count < 2:
            raise UserError(f"fid needs at least 2 generated and 2 reference images, got {len(images)} generated "
                            f"and {self.reference.count} reference images")
        real, fake = self._features(images)
        value = frechet_distance_features(real, fake)
        return MetricResult(self.name, {"fid": value}, [], self.settings())


class KIDMetric(_DistanceMetric):
    """Kernel inception distance (cubic polynomial kernel MMD², unbiased) to the reference images.

    ``aggregate = {"kid_mean", "kid_std"}`` over ``KID_SUBSETS`` seeded subsets of size
    ``min(options.kid_subset_size, n_reference, n_generated)``. Set-level: ``per_sample`` is empty.
    """

    name = "kid"

    def score(self, images: torch.Tensor, prompts: list[str], set_name: str) -> MetricResult:
        """Score one set against the reference folder; ``set_name`` is ignored."""
        check_inputs(images, prompts)
        subset = min(self.options.kid_subset_size, self.reference.count, len(images))
        if subset < 2:
            raise UserError(f"kid needs subsets of at least 2 images, got {len(images)} generated, "
                            f"{self.reference.count} reference images and kid_subset_size="
                            f"{self.options.kid_subset_size}")
        real, fake = self._features(images)
        mean, std = kernel_distance_features(real, fake, subset)
        self._last.update({"kid_subset_size": subset, "kid_subsets": KID_SUBSETS, "kid_seed": KID_SEED})
        return MetricResult(self.name, {"kid_mean": mean, "kid_std": std}, [], self.settings())
