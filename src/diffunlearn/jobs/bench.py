"""``diffunlearn bench``: per-step time and peak memory of the update rules on one model, in one run.

Each method runs in its own fresh Python process (same model folder, same synthetic batches, same
seed), so one method's allocations cannot inflate another's peak: on CUDA the peak is
``torch.cuda.max_memory_allocated`` over the training steps; on a CPU it is the process's peak
resident set size (which also counts the loaded model and libraries, so CPU ratios understate the
differences between methods). Step time is the median over the measured steps, after warm-up.

``rg-flat`` is RG written the way the reference code writes it (flat gradient vectors, PAPER.md §2
memory note); ``rg`` works parameter by parameter with no flat copy.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..errors import UserError

BENCH_METHODS = ("ga", "graddiff", "rg", "rg-flat")
# The concepts of a k-concept bench (--concepts K), in order.
PIXEL_CONCEPTS = ("three", "seven", "red", "blue")
TEMPLATE_CONCEPTS = ("nudity", "van-gogh", "monet", "picasso")


def bench_config(spec: dict):
    """The run config one bench worker trains with (built, and so validated, by the parent first)."""
    from ..config import build_config, model_kind

    return build_config(None, [f"model={spec['model']}", f"method={spec['method']}", f"selection={spec['selection']}",
                              f"batch_size={spec['batch_size']}", f"steps={spec['warmup'] + spec['steps']}",
                              f"mixed_precision={spec['mixed_precision']}", f"device={spec['device']}",
                              f"gradient_checkpointing={spec['gradient_checkpointing']}", "forget_cap=none",
                              f"optimizer={spec['optimizer']}", f"offload_encoders={spec['offload_encoders']}",
                              f"lora_rank={spec['lora_rank']}", f"lora_alpha={spec['lora_rank']}",
                              f"lora_base_dtype={spec.get('lora_base_dtype', 'fp32')}",
                              *([f"lora_targets={spec['lora_targets']}"] if spec["lora_targets"] else []),
                              "diagnose=false", "lr=1e-6",
                              # k concepts the model knows: digits and colours for digit-world models, else templates
                              "concept=" + ",".join((PIXEL_CONCEPTS if model_kind(spec["model"]) == "pixel"
                                                     else TEMPLATE_CONCEPTS)[:spec.get("concepts", 1)])])


def _worker(spec: dict) -> dict:
    """Runs in the child process: load, train ``warmup + steps`` steps, measure."""
    from ..core.parallel import Parallel
    from ..data.training import prompt_texts, training_prompt_sets
    from ..methods import get_method
    from .runfolder import load_for_run

    torch.set_num_threads(max(1, int(spec.get("threads") or torch.get_num_threads())))
    cfg = bench_config(spec)
    adapter, _ = load_for_run(cfg, Parallel())
    n = cfg.batch_size * cfg.steps
    forget_sets, remain_p = training_prompt_sets(cfg, n=n)
    remain_p = prompt_texts(remain_p)
    # The bench needs latents of the model's shape, not pictures: random ones cost no VAE pass.
    if hasattr(adapter, "latent_shape"):  # latent families (FLUX packs its latents, so not the network's input)
        shape = (n, *adapter.latent_shape)
    else:
        unet_config = adapter.unet.config
        shape = (n, unet_config.in_channels, unet_config.sample_size, unet_config.sample_size)
    gen = torch.Generator().manual_seed(0)
    fx = [torch.randn(shape, generator=gen) for _ in forget_sets]
    rx = torch.randn(shape, generator=gen)
    fc, rc = [adapter.encode_prompts(prompt_texts(p)) for p in forget_sets], adapter.encode_prompts(remain_p)
    if len(forget_sets) == 1:  # one concept: the loop's one-set form
        fx, fc = fx[0], fc[0]
    cuda = adapter.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    history = get_method(cfg.method).apply(adapter, cfg, fx, fc, rx, rc, progress=False)
    if cuda:
        torch.cuda.synchronize()
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    timed = [h["seconds"] for h in history[spec["warmup"]:]]
    return {"step_seconds": statistics.median(timed), "peak_memory_mb": peak_mb,
            "projected_fraction": sum(bool(h.get("projected")) for h in history) / len(history),
            "device": str(adapter.device)}


def run_bench(model: str, methods: tuple[str, ...] = BENCH_METHODS, batch_size: int = 8, steps: int = 5,
              warmup: int = 2, mixed_precision: str = "no", selection: str = "full", device: str = "auto",
              gradient_checkpointing: bool = False, progress: bool = True, optimizer: str = "adam",
              offload_encoders: bool = False, lora_rank: int = 4, lora_targets: str = "",
              concepts: int = 1, lora_base_dtype: str = "fp32") -> dict[str, dict]:
    """Benchmark ``methods`` on the model folder ``model``; returns ``{method: measurements}``.

    The memory settings (``mixed_precision``, ``gradient_checkpointing``, ``optimizer``, ``offload_encoders``,
    a ``lora`` selection with ``lora_rank`` on ``lora_targets``, empty = the config's default, its frozen
    base in ``lora_base_dtype``) are the
    run config's keys of the same names. ``concepts`` = k forget sets a step (several concepts at
    once: k forget gradients live together, which is what the k-way rule costs).

    Raises:
        UserError: bad arguments, or a worker process failed (its last error line is quoted).
    """
    from ..config import model_kind
    from ..methods import get_method

    for m in methods:
        get_method(m)
    if model_kind(model) == "class":
        raise UserError(f"{model} is a class-conditional model; bench measures text-to-image models (a Stable "
                        "Diffusion folder, a preset or embedded:digits)")
    if steps < 1 or warmup < 0 or batch_size < 1:
        raise UserError("--steps and --batch-size must be >= 1 and --warmup >= 0")
    if not 1 <= concepts <= len(PIXEL_CONCEPTS):
        raise UserError(f"--concepts must be between 1 and {len(PIXEL_CONCEPTS)}, got {concepts}")
    results: dict[str, dict] = {}
    for method in methods:
        spec = {"model": model, "method": method, "batch_size": batch_size, "steps": steps, "warmup": warmup,
                "mixed_precision": mixed_precision, "selection": selection, "device": device,
                "gradient_checkpointing": gradient_checkpointing, "threads": torch.get_num_threads(),
                "optimizer": optimizer, "offload_encoders": offload_encoders, "lora_rank": lora_rank,
                "lora_targets": lora_targets, "concepts": concepts, "lora_base_dtype": lora_base_dtype}
        bench_config(spec)  # a bad combination of settings fails here, before any worker starts
        if progress:
            print(f"bench {method}: {warmup} warm-up + {steps} timed steps at batch {batch_size}", file=sys.stderr)
        proc = subprocess.run([sys.executable, "-m", "diffunlearn.jobs.bench", json.dumps(spec)], capture_output=True,
                              text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"bench worker for {method} failed: {last}")
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def bench_table(results: dict[str, dict], baseline: str = "graddiff") -> str:
    """Markdown table with time and memory ratios to ``baseline`` (when it was measured)."""
    base = results.get(baseline)
    rows = ["| method | step seconds | peak memory MB | time / graddiff | memory / graddiff | projected steps |",
            "|---|---|---|---|---|---|"]
    for name, r in results.items():
        t_ratio = f"{r['step_seconds'] / base['step_seconds']:.3f}" if base else "-"
        m_ratio = f"{r['peak_memory_mb'] / base['peak_memory_mb']:.3f}" if base else "-"
        rows.append(f"| {name} | {r['step_seconds']:.4f} | {r['peak_memory_mb']:.0f} | {t_ratio} | {m_ratio} | "
                    f"{r['projected_fraction']:.2f} |")
    return "\n".join(rows)


def bench_model_folder(preset: str | None, model: str | None, workdir: Path, dtype: str | None = None) -> str:
    """The model to benchmark: ``model`` as given, or a random-weight ``preset`` built into ``workdir``
    (on the GPU when there is one: initialising FLUX-size weights takes minutes on a CPU; saved in
    ``dtype``, e.g. ``bf16`` for a bf16 bench, which halves the folder: FLUX.1-dev 33 GB)."""
    if preset is not None and model is not None:
        raise UserError("pass one of --model FOLDER and --preset NAME, not both")
    if preset is None and model is None:
        preset = "tiny"  # `diffunlearn bench` alone: the seconds-long tiny preset
    if model is not None:
        return model
    from ..models.presets import init_pipeline

    device = "cuda" if torch.cuda.is_available() else None
    return str(init_pipeline(preset, workdir / preset, seed=0, dtype=dtype, device=device))


def temporary_workdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="diffunlearn-bench-")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        print(json.dumps(_worker(json.loads(sys.argv[1]))))
    except UserError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
