"""The model card (README.md) written beside every unlearned model: what was removed, how, from what
data, with which hyperparameters, and what the evaluation found. Hugging Face reads the YAML front
matter (library, base model, tags) when the folder is pushed to the hub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ..config import UnlearnConfig
from ..families import PIPELINES, model_kind
from ..methods import get_method
from ..utils import atomic_write_text

LOAD_SNIPPETS = {
    "pipeline": ("from diffusers import {pipeline}\n"
                 "pipe = {pipeline}.from_pretrained(\"{folder}\")"),
    "unet": ("from diffusers import {pipeline}, {network}\n"
             "{denoiser} = {network}.from_pretrained(\"{folder}\")\n"
             "pipe = {pipeline}.from_pretrained(\"{base}\", {denoiser}={denoiser})"),
    "lora": ("from diffusers import {pipeline}\n"
             "pipe = {pipeline}.from_pretrained(\"{base}\")\n"
             "pipe.load_lora_weights(\"{folder}\")"),
    "class": ("from diffusers import DDIMScheduler, UNet2DModel\n"
              "unet = UNet2DModel.from_pretrained(\"{folder}/unet\")\n"
              "scheduler = DDIMScheduler.from_pretrained(\"{folder}/scheduler\")\n"
              "# or: from diffunlearn.models import load_adapter; adapter, _ = load_adapter(\"{folder}\")"),
    "pixel": ("from diffunlearn.models import load_adapter\n"
              "adapter, _ = load_adapter(\"{folder}\")"),
}


def lineage_lines(lineage: list[dict] | None) -> list[str]:
    """The model card's lineage section: every request this model has served (none for a first one)."""
    if not lineage or len(lineage) < 2:
        return []
    lines = ["## Lineage", "", "Every concept removed so far, one request after another:", ""]
    for i, e in enumerate(lineage, 1):
        settings = ", ".join(f"{k} {v}" for k, v in e["settings"].items())
        lines.append(f"{i}. `{', '.join(e['concepts'])}` with `{e['method']}` ({settings}) from `{e['from_model']}`")
    return [*lines, ""]


def write_model_card(folder: Path, cfg: UnlearnConfig, save_format: str, base_model: str, command: str,
                     data: dict[str, Any], training: dict[str, Any], evaluation: dict[str, Any] | None,
                     lineage: list[dict] | None = None) -> Path:
    """Write ``folder/README.md``; returns its path.

    Args:
        save_format: "pipeline", "unet", "lora" or "pixel" (how the folder is loaded).
        data: what trained it (prompt source, pair count, diversity, generation settings, manifests).
        training: summary statistics of the run (steps, final losses, conflict fraction, seconds).
        evaluation: metrics, or None when the model was not evaluated.
    """
    method = get_method(cfg.method)
    front = {"library_name": "diffusers", "base_model": base_model,
             "tags": ["diffunlearn", "machine-unlearning", "concept-erasure", cfg.method, cfg.concept]}
    # The family's own pipeline and network classes (SD 1.x/2.x by default).
    pipeline, denoiser, network = PIPELINES.get(model_kind(cfg.model), PIPELINES["text"])
    snippet = LOAD_SNIPPETS[save_format].format(folder=folder, base=base_model, pipeline=pipeline,
                                                denoiser=denoiser, network=network)
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {base_model} with '{cfg.concept}' unlearned ({cfg.method})", "",
        f"This model is `{base_model}` fine-tuned by [diffunlearn](https://pypi.org/project/diffunlearn/) to stop "
        f"generating **{cfg.concept}** while following other prompts.", "",
        f"- Method: `{cfg.method}`: {method.summary}.",
        f"- Trained parameters: `{cfg.selection}`"
        + (f" (LoRA rank {cfg.lora_rank}, alpha {cfg.lora_alpha}, modules {cfg.lora_targets})"
           if cfg.selection == "lora" else "") + f"; saved as `{save_format}`.",
        f"- Reproduce: `{command}`", "",
        "## Load it", "", "```python", snippet, "```", "",
        *lineage_lines(lineage),
        "## Data", "", "```json", json.dumps(data, indent=2), "```", "",
        "## Hyperparameters", "", "```yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).strip(), "```", "",
        "## Training", "", "```json", json.dumps(training, indent=2), "```", "",
        "## Evaluation", "",
    ]
    if evaluation:
        lines += ["```json", json.dumps(evaluation, indent=2), "```", ""]
    else:
        lines += ["Not evaluated in this run: score it with held-out prompts before you ship it.", ""]
    lines += ["## Limits", "",
              "Unlearning lowers how often the concept appears for the prompts it was tested on; it is not a proof "
              "that the concept cannot be produced (paraphrases and adversarial prompts may still reach it).", ""]
    path = folder / "README.md"
    atomic_write_text(path, "\n".join(lines))
    return path
