"""CLIP for evaluation: offline loading (safetensors only), torchvision-free preprocessing, embeddings.

The paper scores alignment with open_clip's ViT-B-32 ``laion2b_s34b_b79k`` (PAPER.md §4); its
transformers conversion ``laion/CLIP-ViT-B-32-laion2B-s34B-b79K`` is the default here. Nothing is
downloaded unless ``HF_HUB_OFFLINE=0``: a hub id is read from the local Hugging Face cache, or the
user passes a folder.

Preprocessing reproduces ``CLIPImageProcessor`` on tensors (resize the shortest side with bicubic
interpolation, centre crop, normalise) so that batched ``(N, 3, H, W)`` images in [-1, 1] go in
without a PIL round trip or torchvision. It works in float, where the processor works on uint8 PIL
images, so pixels differ by rounding only.

:func:`build_tiny_clip` writes a small random-weight CLIP with the committed tokenizer: tests and
users can run the whole evaluation pipeline offline with it (its numbers mean nothing).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F

from ..errors import UserError

if TYPE_CHECKING:  # heavy imports stay lazy at run time
    from transformers import CLIPModel, PreTrainedTokenizerBase

# OpenAI CLIP's normalisation constants, used when a model ships no preprocessor config.
OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

_MISSING_HINT = "put the weights in a folder and pass --clip-model FOLDER, or set HF_HUB_OFFLINE=0 with network"


def local_files_only() -> bool:
    """Downloads happen only when the user explicitly sets ``HF_HUB_OFFLINE=0``."""
    return os.environ.get("HF_HUB_OFFLINE", "1").strip().lower() in ("1", "true", "yes", "on", "")


@dataclasses.dataclass(frozen=True)
class ImagePreprocess:
    """Images ``(N, 3, H, W)`` float in [-1, 1] -> model pixel values ``(N, 3, h, w)`` float32.

    Exactly one of ``shortest_edge`` (resize keeping the aspect ratio so the shorter side has this
    length, as CLIP does) and ``size`` (resize to exactly ``(height, width)``, as ViT classifiers do)
    is set. ``crop`` is the centre crop ``(height, width)`` applied after resizing, or ``None``.
    """

    shortest_edge: int | None
    size: tuple[int, int] | None
    crop: tuple[int, int] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float().clamp(-1, 1) + 1) / 2
        height, width = x.shape[-2:]
        if self.shortest_edge is not None:
            # Same output size rule as transformers' get_resize_output_image_size(default_to_square=False).
            short, long = (height, width) if height <= width else (width, height)
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
            target = (new_short, new_long) if height <= width else (new_long, new_short)
        else:
            if self.size is None:
                raise RuntimeError("ImagePreprocess needs shortest_edge or size; build it with preprocess_from_config")
            target = self.size
        if tuple(target) != (height, width):
            x = F.interpolate(x, size=target, mode="bicubic", align_corners=False, antialias=True)
            # Bicubic overshoots at edges; the PIL path clips to [0, 255], so we clip to [0, 1].
            x = x.clamp(0, 1)
        if self.crop is not None:
            ch, cw = self.crop
            h, w = x.shape[-2:]
            if ch > h or cw > w:  # only for odd configs (crop larger than the resize): grow first
                x = F.interpolate(x, size=(max(ch, h), max(cw, w)), mode="bicubic", align_corners=False,
                                  antialias=True).clamp(0, 1)
                h, w = x.shape[-2:]
            top, left = (h - ch) // 2, (w - cw) // 2  # transformers' center_crop offsets
            x = x[..., top:top + ch, left:left + cw]
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device)[:, None, None]
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device)[:, None, None]
        return ((x - mean) / std).contiguous()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description, for manifests."""
        return dataclasses.asdict(self)


def _pair(value: Any) -> tuple[int, int] | None:
    """A processor-config size (``int``, ``{"height", "width"}`` or ``{"shortest_edge"}``) as (h, w)."""
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, dict) and "height" in value and "width" in value:
        return (int(value["height"]), int(value["width"]))
    if isinstance(value, dict) and "shortest_edge" in value:
        return (int(value["shortest_edge"]),) * 2
    return None


def preprocess_from_config(config: dict[str, Any] | None, default_size: int,
                           default_mean: Sequence[float] = OPENAI_CLIP_MEAN,
                           default_std: Sequence[float] = OPENAI_CLIP_STD) -> ImagePreprocess:
    """Build an :class:`ImagePreprocess` from a ``preprocessor_config.json`` dict (``None``: defaults).

    Understands CLIP's ``size={"shortest_edge": s}`` + ``crop_size`` and ViT's
    ``size={"height", "width"}``; an int ``size`` is a shortest edge (old CLIP configs). Without a
    config: shortest edge and centre crop ``default_size`` with the given mean/std.
    """
    if not config:
        return ImagePreprocess(default_size, None, (default_size, default_size), tuple(default_mean),
                               tuple(default_std))
    size = config.get("size", default_size)
    shortest, exact = None, None
    if config.get("do_resize", True):
        if isinstance(size, int):
            shortest = size
        elif isinstance(size, dict) and "shortest_edge" in size:
            shortest = int(size["shortest_edge"])
        else:
            exact = _pair(size) or (default_size, default_size)
    crop = _pair(config.get("crop_size")) if config.get("do_center_crop", False) else None
    if config.get("do_normalize", True):
        mean, std = config.get("image_mean", default_mean), config.get("image_std", default_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    # Scalar mean/std in a config mean "the same for every channel".
    mean = [float(mean)] * 3 if isinstance(mean, (int, float)) else [float(m) for m in mean]
    std = [float(std)] * 3 if isinstance(std, (int, float)) else [float(s) for s in std]
    return ImagePreprocess(shortest, exact, crop, tuple(mean), tuple(std))


def read_preprocessor_config(name_or_folder: str) -> dict[str, Any] | None:
    """The ``preprocessor_config.json`` of a folder or a (locally cached) hub id, or ``None``."""
    folder = Path(name_or_folder)
    if folder.is_dir():
        path: str | Path | None = folder / "preprocessor_config.json"
        if not Path(path).is_file():
            return None
    else:
        from transformers.utils import cached_file

        try:
            path = cached_file(name_or_folder, "preprocessor_config.json", local_files_only=local_files_only(),
                               _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
        except OSError:
            path = None
        if path is None:
            return None
    return json.loads(Path(path).read_text(encoding="utf-8"))


def config_hash(config: Any) -> str:
    """First 16 hex digits of the SHA-256 of a transformers config, without path/version fields.

    Keys starting with ``_`` (``_name_or_path``, ``_commit_hash``) and ``transformers_version`` are
    dropped at every level, so the same model gives the same hash from any folder or library version.
    """

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if not str(k).startswith("_") and k != "transformers_version"}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    text = json.dumps(clean(config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pooled(output: Any) -> torch.Tensor:
    """transformers 5 returns a model output with the projection in ``pooler_output``; older a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def image_features(model: CLIPModel, preprocess: ImagePreprocess, images: torch.Tensor,
                   batch_size: int = 32) -> torch.Tensor:
    """Projected CLIP image embeddings, NOT normalised: ``(N, 3, H, W)`` in [-1, 1] -> ``(N, D)`` float32."""
    device = _device_of(model)
    out = []
    for i in range(0, len(images), batch_size):
        pixels = preprocess(images[i:i + batch_size].to(device))
        out.append(_pooled(model.get_image_features(pixel_values=pixels)).float().cpu())
    if not out:
        return torch.zeros(0, model.config.projection_dim)
    return torch.cat(out)


def image_embeddings(model: CLIPModel, preprocess: ImagePreprocess, images: torch.Tensor,
                     batch_size: int = 32) -> torch.Tensor:
    """L2-normalised CLIP image embeddings: ``(N, 3, H, W)`` in [-1, 1] -> ``(N, D)`` float32 on the CPU."""
    return F.normalize(image_features(model, preprocess, images, batch_size), dim=-1)


@torch.no_grad()
def text_embeddings(model: CLIPModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                    batch_size: int = 32) -> torch.Tensor:
    """L2-normalised CLIP text embeddings: ``N`` texts -> ``(N, D)`` float32 on the CPU.

    Texts longer than the model's context (77 tokens for CLIP) are truncated, keeping the end token,
    as open_clip's tokenizer does.
    """
    device = _device_of(model)
    max_length = model.config.text_config.max_position_embeddings
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt")
        features = model.get_text_features(input_ids=tokens["input_ids"].to(device),
                                           attention_mask=tokens["attention_mask"].to(device))
        out.append(F.normalize(_pooled(features).float(), dim=-1).cpu())
    if not out:
        return torch.zeros(0, model.config.projection_dim)
    return torch.cat(out)


class ClipBundle(NamedTuple):
    """``(model, tokenizer, preprocess)`` as returned by :func:`load_clip`, with embedding helpers."""

    model: CLIPModel
    tokenizer: PreTrainedTokenizerBase
    preprocess: ImagePreprocess

    def image_embeddings(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """``(N, 3, H, W)`` in [-1, 1] -> ``(N, D)`` L2-normalised float32."""
        return image_embeddings(self.model, self.preprocess, images, batch_size)

    def image_features(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """``(N, 3, H, W)`` in [-1, 1] -> ``(N, D)`` projected, unnormalised float32."""
        return image_features(self.model, self.preprocess, images, batch_size)

    def text_embeddings(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """``N`` texts -> ``(N, D)`` L2-normalised float32."""
        return text_embeddings(self.model, self.tokenizer, texts, batch_size)

    def settings(self, name: str) -> dict[str, Any]:
        """What identifies this CLIP in a manifest: the name given, a config hash, the hub revision
        (when loaded from the hub cache) and the preprocessing."""
        info: dict[str, Any] = {"clip_model": name, "clip_config_sha256": config_hash(self.model.config),
                                "clip_preprocess": self.preprocess.to_dict()}
        revision = getattr(self.model.config, "_commit_hash", None)
        if revision:
            info["clip_revision"] = revision
        return info


def _check_folder(name: str) -> None:
    """Refuse a path-like name that is not a folder, before transformers mistakes it for a hub id."""
    path = Path(name).expanduser()
    looks_like_path = path.is_absolute() or name.startswith((".", "~"))
    if (looks_like_path or path.exists()) and not path.is_dir():
        raise UserError(f"the CLIP model folder {name} does not exist; {_MISSING_HINT}")


# Loaded models, shared by the metrics of one process (alignment, classifier and FID features often
# use the same CLIP; loading it once saves memory and seconds). Models are eval-mode and never trained.
_LOADED: dict[tuple[str, str], ClipBundle] = {}


def load_clip(name_or_folder: str, device: str | torch.device = "cpu") -> ClipBundle:
    """Load a CLIP model, its tokenizer and its image preprocessing, safetensors only.

    Args:
        name_or_folder: a local folder in transformers layout (``config.json``, ``model.safetensors``,
            tokenizer files, optionally ``preprocessor_config.json``) or a hub id; a hub id is read
            from the local Hugging Face cache only, unless ``HF_HUB_OFFLINE=0``.
        device: where the model runs; embeddings are always returned on the CPU.

    Returns:
        A :class:`ClipBundle` ``(model, tokenizer, preprocess)`` (unpacks as a 3-tuple); the model is
        float32 and in eval mode. Repeated calls with the same arguments return the same objects.

    Raises:
        UserError: the model, its safetensors weights or its tokenizer cannot be found locally.
    """
    from transformers import CLIPModel, CLIPTokenizer

    key = (str(name_or_folder), str(device))
    if key in _LOADED:
        return _LOADED[key]
    offline = local_files_only()
    _check_folder(str(name_or_folder))
    try:
        model = CLIPModel.from_pretrained(name_or_folder, use_safetensors=True, local_files_only=offline,
                                          dtype=torch.float32)
    except (OSError, ValueError) as e:
        where = "in that folder" if Path(name_or_folder).is_dir() else "in the local Hugging Face cache"
        raise UserError(f"cannot load the CLIP model {name_or_folder!r} as safetensors {where}; "
                        f"{_MISSING_HINT}") from e
    try:
        tokenizer = CLIPTokenizer.from_pretrained(name_or_folder, local_files_only=offline)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"cannot load the tokenizer of the CLIP model {name_or_folder!r}; {_MISSING_HINT}") from e
    preprocess = preprocess_from_config(read_preprocessor_config(name_or_folder), model.config.vision_config.image_size)
    bundle = ClipBundle(model.to(device).eval(), tokenizer, preprocess)
    _LOADED[key] = bundle
    return bundle


TINY_CLIP_SIZE = 32


def build_tiny_clip(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random-weight CLIP (transformers layout, safetensors) that loads offline.

    Vision tower: 32x32 images, 8x8 patches, width 32, 2 layers; text tower: width 32, 2 layers,
    the committed tokenizer's vocabulary (``diffunlearn.models.presets.load_tokenizer``); 32-d joint
    space; a ``preprocessor_config.json`` with OpenAI's mean/std. The weights are a deterministic
    function of ``seed`` and the library versions. Useful for trying ``diffunlearn eval`` offline and
    for tests; its scores carry no meaning.

    Returns:
        ``folder``, loadable with :func:`load_clip` (pass it as ``--clip-model``).
    """
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    from ..models.presets import load_tokenizer

    folder = Path(folder)
    tokenizer = load_tokenizer()
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                          projection_dim=32, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = CLIPVisionConfig(image_size=TINY_CLIP_SIZE, patch_size=8, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu", projection_dim=32)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32)
    # A private RNG state: building the model must not change the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor = {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": TINY_CLIP_SIZE},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": TINY_CLIP_SIZE, "width": TINY_CLIP_SIZE},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD), "do_convert_rgb": True,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n", encoding="utf-8")
    return folder
