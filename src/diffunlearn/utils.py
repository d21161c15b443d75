"""Small shared helpers: atomic writes, fingerprints, environment facts."""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path


def image_seeds(seed: int, n: int, offset: int = 0) -> list[int]:
    """The recorded per-image seeds of a set: image i uses ``seed * 100000 + offset + i``."""
    return [seed * 100000 + offset + i for i in range(n)]


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temporary name and rename, so a reader never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """SHA-256 over the relative paths and bytes of every file in ``folder`` (first 16 hex digits)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.name.endswith(".tmp"):
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def environment() -> dict[str, str]:
    """Versions of Python and the libraries that decide numbers, for run folders and bug reports."""
    import importlib.metadata as md

    info = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("diffunlearn", "torch", "diffusers", "transformers", "accelerate", "peft", "safetensors",
                 "torchmetrics", "nudenet", "onnxruntime", "scikit-learn", "numpy"):
        try:
            info[name] = md.version(name)
        except md.PackageNotFoundError:
            info[name] = "not installed"
    return info


def avoid_cudnn_attention() -> None:
    """Turn off PyTorch's cuDNN backend of scaled-dot-product attention for this process (flash,
    memory-efficient and math stay). On the H200 GPU check (torch 2.11 + cu130) the FLUX.1-dev-size
    LoRA step failed inside it (`mha_graph.execute(...).is_good()`, surfacing without
    CUDA_LAUNCH_BLOCKING as a CUBLAS_STATUS_EXECUTION_FAILED) and ran with it off: 3.40 s a step at
    batch 2, peak 27.8 GB. The other backends cover every shape these models use. Called when a model
    is loaded onto a GPU (``load_adapter``) and when a training engine starts there, so training,
    evaluation and the attacks (which backpropagate through the denoiser too) all avoid it."""
    import torch

    if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(False)
