"""``diffunlearn eval``: generate images for prompt sets with a model and score them with metrics from
the registry, recording every setting that decides a number.

Output folder::

    images/<set>/      one PNG per prompt + request.json + manifest.json (resumable, sharded)
    manifest.json      versions, model identity, sampler settings, seeds, prompt-file hashes, metric settings
    per_sample.jsonl   one line per generated image: set, index, prompt, seed, guidance, each metric's values
    results.json       {metric: {set: aggregate}}; written LAST, so its presence marks a finished evaluation
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..core.parallel import Parallel
from ..errors import UserError
from ..utils import atomic_write_text, environment, image_seeds


@dataclasses.dataclass
class SamplerSettings:
    steps: int
    guidance: float
    seed: int              # image i of a set without its own seeds uses seed * 100000 + i
    resolution: int = 0    # 0 = the model's default
    batch_size: int = 8


def _model_identity(adapter, folder: Path | None, source: str) -> dict[str, Any]:
    from ..utils import folder_fingerprint

    identity: dict[str, Any] = {"source": source}
    if hasattr(adapter, "model_identity"):
        identity.update(adapter.model_identity())
    if folder is not None:
        identity["folder_sha"] = folder_fingerprint(folder)
    return identity


def load_model_or_run(target: str, device: str = "auto"):
    """A model folder, a hub id, or a finished run folder -> ``(adapter, identity, run_config | None)``.

    A run folder's model is loaded in its saved format: a full pipeline or pixel model directly, a
    UNet or LoRA on top of the run's base model.

    Raises:
        UserError: unfinished run, missing model, unknown format.
    """
    import torch

    from ..config import build_config
    from ..models import load_adapter

    path = Path(target).expanduser()
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if (path / "config.yaml").is_file() and ((path / "model").exists() or (path / "metrics.jsonl").is_file()):
        if not (path / "results.json").is_file():
            raise UserError(f"{path} is an unfinished run (no results.json); finish it with "
                            f"`diffunlearn unlearn --resume {path}` before evaluating it")
        cfg = build_config(path / "config.yaml")
        model_dir = path / "model"
        if (model_dir / "pytorch_lora_weights.safetensors").is_file():
            adapter, base_folder = load_adapter(cfg.model, device=dev)
            adapter.load_lora(model_dir)
            identity = _model_identity(adapter, base_folder, cfg.model)
            identity["lora"] = str(model_dir)
            # The base folder's hash alone would not change when the run is trained again in place.
            from ..utils import folder_fingerprint

            identity["lora_sha"] = folder_fingerprint(model_dir)
        elif (model_dir / "config.json").is_file() and not (model_dir / "model_index.json").is_file():
            adapter, base_folder = load_adapter(cfg.model, device=dev)
            adapter.load_unet(model_dir)
            identity = _model_identity(adapter, model_dir, cfg.model)
            identity["unet"] = str(model_dir)
        else:
            adapter, folder = load_adapter(str(model_dir), device=dev)
            identity = _model_identity(adapter, folder, str(model_dir))
        identity["run"] = str(path)
        return adapter, identity, cfg
    adapter, folder = load_adapter(target, device=dev)
    return adapter, _model_identity(adapter, folder, target), None


def default_sampler(adapter, run_cfg) -> tuple[int, float, int]:
    """(steps, guidance, seed): the run's evaluation settings, else the model family's defaults."""
    if run_cfg is not None:
        return run_cfg.eval_steps, run_cfg.eval_guidance, run_cfg.eval_seed
    steps, guidance = adapter.sampler_defaults
    return steps, guidance, 1


def _check_prompts_fit_model(adapter, specs: list[str]) -> None:
    """Refuse built-in prompt sets of another world: a digit model prompted with nudity templates
    would be scored (forget score 0.25 once) on prompts it cannot draw."""
    from ..models.pixel import PixelTextToImage

    is_world = isinstance(adapter, PixelTextToImage)
    for spec in specs:
        if is_world and spec.startswith("template:"):
            raise UserError(f"--prompts {spec} is a Stable Diffusion prompt set, but this is a digit-world model; "
                            "use world:CONCEPT, e.g. world:three:test:forget")
        if not is_world and spec.startswith("world:"):
            raise UserError(f"--prompts {spec} is a digit-world prompt set, but this model is not a digit-world "
                            "model; use template:CONCEPT or a prompt file")


def evaluate(target: str, metric_names: list[str], prompt_specs: list[str], out: Path, options,
             sampler: SamplerSettings | None = None, force: bool = False, progress: bool = True,
             command: str = "diffunlearn eval", device: str = "auto") -> dict:
    """Run the evaluation; returns the results written to ``out/results.json``.

    Raises:
        UserError: bad model, prompt file, metric name or settings; a finished evaluation without ``force``.
    """
    from ..data.images import generate_image_set
    from ..evaluate.base import build_metric
    from ..evaluate.prompt_sets import resolve_prompt_sets

    if not metric_names:
        raise UserError("no metrics given; pass --metrics, e.g. --metrics alignment,nudenet")
    if not prompt_specs:
        raise UserError("no prompt sets given; pass --prompts FILE or e.g. --prompts template:nudity:test:forget")
    prompt_sets = resolve_prompt_sets(prompt_specs)  # bad files fail before any model is loaded
    metrics = [build_metric(name, options) for name in metric_names]
    parallel = Parallel.from_environment()
    adapter, identity, run_cfg = load_model_or_run(target, device)
    _check_prompts_fit_model(adapter, prompt_specs)
    if sampler is None:
        steps, guidance, seed = default_sampler(adapter, run_cfg)
        sampler = SamplerSettings(steps, guidance, seed)
    if parallel.is_main:
        if (out / "results.json").exists():
            if not force:
                raise UserError(f"{out} already holds a finished evaluation; choose another --out or pass --force "
                                "(finished images are reused)")
            (out / "results.json").unlink()
        out.mkdir(parents=True, exist_ok=True)
    parallel.barrier()
    # Every metric's resources (CLIP folder, oracle, classifier, reference images) and required
    # options are checked before a single image is generated, not after an hour of sampling.
    set_names = [ps.name for ps in prompt_sets]
    for metric in metrics:
        if hasattr(metric, "check"):
            metric.check(set_names)
    settings = {metric.name: metric.settings() for metric in metrics} if parallel.is_main else {}
    model_id = json.dumps(identity, sort_keys=True)
    sets_info, generated = [], {}
    for ps in prompt_sets:
        defaults = image_seeds(sampler.seed, len(ps.prompts))
        seeds = [s if s is not None else d for s, d in zip(ps.seeds, defaults)]
        guidances = [g if g is not None else sampler.guidance for g in ps.guidances]
        images = generate_image_set(
            adapter, model_id, ps.prompts, seeds, out / "images" / ps.name, sampler.steps, sampler.guidance, progress,
            resolution=sampler.resolution, batch_size=sampler.batch_size, replace=True, parallel=parallel,
            guidances=guidances if any(g is not None for g in ps.guidances) else None)
        generated[ps.name] = (ps, seeds, guidances, images)
        sets_info.append({"name": ps.name, "source": ps.source, "sha256": ps.sha256, "n": len(ps.prompts),
                          "seeds": seeds, "guidances": guidances})
    if not parallel.is_main:
        return {}
    results: dict[str, dict[str, dict]] = {}
    rows = {name: [{"set": name, "index": i, "prompt": p, "seed": s, "guidance": g}
                   for i, (p, s, g) in enumerate(zip(ps.prompts, seeds, guidances))]
            for name, (ps, seeds, guidances, _) in generated.items()}
    for metric in metrics:
        for name, (ps, _, _, images) in generated.items():
            result = metric.score(images, ps.prompts, name)
            results.setdefault(metric.name, {})[name] = result.aggregate
            for row, values in zip(rows[name], result.per_sample):
                row[metric.name] = values
    manifest = {"command": command, "environment": environment(), "model": identity,
                "sampler": {**dataclasses.asdict(sampler), "name": getattr(adapter, "sampler_name",
                                                                            "DPMSolverMultistepScheduler")},
                "prompt_sets": sets_info, "metrics": settings}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    atomic_write_text(out / "per_sample.jsonl", "".join(json.dumps(r) + "\n" for rs in rows.values() for r in rs))
    final = {"model": identity.get("run") or identity.get("source"), "metrics": results}
    atomic_write_text(out / "results.json", json.dumps(final, indent=2) + "\n")
    return final
