"""Typed run configuration: commented defaults as plain Python, YAML files and ``key=value``
overrides on top, every problem reported at once (torchtune's ``validate`` idea)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

# The embedded names and how a folder tells its family belong to the model families; the config
# needs both for its defaults (families.py imports nothing of diffunlearn but its errors).
from .families import EMBEDDED, EMBEDDED_CLASS, model_kind  # noqa: F401  (re-exported)


@dataclasses.dataclass
class UnlearnConfig:
    """Everything one unlearning run needs. Defaults are the digit world's tuned values (README)."""

    # --- model and concept ---
    model: str = EMBEDDED          # a model folder, "embedded:digits" or "embedded:digits-class" (committed models)
    concept: str = "three"         # the word to forget (a digit or a colour in the digit world; a class name)
    method: str = "rg"             # a key of diffunlearn.methods.METHODS
    selection: str = "full"        # trainable UNet parameters: full, cross-attention, non-cross-attention, lora
    lora_rank: int = 4             # LoRA rank (selection "lora", through peft)
    lora_alpha: float = 4.0        # LoRA scaling alpha
    lora_targets: str = "to_q,to_k,to_v,to_out.0"  # comma-separated module names LoRA wraps
    # --- data (PAPER.md §3) ---
    diversity: str = "diverse"     # "diverse" (paired templates) or "uniform" (one prompt each, repeated)
    num_pairs: int = 256           # forget/remain prompt pairs; one generated image per prompt
    data_seed: int = 0             # prompt drawing and image seeds (image i uses data_seed * 100000 + i)
    data_steps: int = 12           # sampler steps when the base model generates the training images
    data_guidance: float = 4.0     # classifier-free guidance for those images
    data_dir: str = ""             # a folder from `diffunlearn data build`; empty = build inside the run folder
    images: str = ""               # class-conditional: ImageFolder or .npz of training images ("" = embedded)
    remain_per_class: int = 50     # class-conditional: remain images drawn from each other class (balanced D_r)
    remain_classes: str = ""       # class-conditional: "a,b" = low-diversity control (same total, these classes)
    resolution: int = 0            # image side for generated data and samples; 0 = the model's default
    sample_batch_size: int = 0     # images per sampler call; 0 = auto (256 for digit-world models, else batch_size)
    # --- optimisation (PAPER.md §2) ---
    steps: int = 100               # optimizer steps; each sees one paired forget/remain batch
    batch_size: int = 16           # paired forget/remain images per step
    micro_batches: int = 1         # N sequential chunks per batch (gradient accumulation): same update, less memory
    lr: float = 5e-5               # Adam learning rate
    remain_weight: float = 1.6     # λ in d = δ_f + λ·δ_r (the SD reference calls it alpha; 1.6 there)
    forget_cap: str = "hinge"      # "hinge" (batch stop at margin), "elementwise" (min(err², alpha)), "none"
    margin: float = 1.1            # hinge margin m on the batch ε-MSE
    margin_mode: str = "absolute"  # "absolute" (m as given) or "relative" (m × the model's own forget loss at step 0)
    alpha: float = 0.1             # element-wise cap α
    max_grad_norm: float = 0.0     # clip the combined direction to this norm; 0 disables
    esd_eta: float = 1.0           # ESD negative-guidance scale η (methods esd-u, esd-x)
    saliency_fraction: float = 0.5 # SalUn: fraction of parameter entries kept trainable by the saliency mask
    cone_margin: float = 0.0       # rg-opt: each loss must improve by at least this × |g|·|u| to first order
    anchor: str = ""               # SalUn remap prompt; empty = each forget prompt's paired remain prompt
    seed: int = 0                  # batch order, noise and timesteps
    # --- memory, speed and faults ---
    mixed_precision: str = "no"    # "no", "bf16" or "fp16" autocast; trainable weights stay fp32 (master copy)
    gradient_checkpointing: bool = False  # recompute UNet activations in backward: less memory, ~30% slower
    optimizer: str = "adam"        # "adam" or "adam8bit" (bitsandbytes, the `8bit` extra)
    device: str = "auto"           # "auto" (CUDA when present), "cpu" or "cuda"
    threads: int = 0               # torch CPU threads of this process; 0 = torch's default (one per core)
    checkpoint_every: int = 0      # write a resumable checkpoint every N steps; 0 = never
    diagnose: bool = True          # log each step's realised loss change (two extra forward passes)
    save: str = "auto"             # "pipeline", "unet", "lora" or "auto" (lora for selection lora, else pipeline)
    # --- evaluation ---
    eval_prompts: int = 100        # held-out prompts per set (forget and remain)
    eval_seed: int = 1             # image i of an evaluation set uses eval_seed * 100000 + i
    eval_split: str = "test"       # digit world: "test" = held-out vocabulary (reports), "train" = tuning vocabulary
    eval_steps: int = 12            # sampler steps of the evaluation images
    eval_guidance: float = 4.0     # classifier-free guidance of the evaluation images

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(UnlearnConfig)}

# Stable Diffusion runs start from the reference recipe (PAPER.md §2-3), not from the digit world's
# tuned values: Adam lr 1e-5, batch 8, 100 paired steps over 800 prompt pairs, λ 1.6, m 1.1, full
# UNet, training images made with the pipeline defaults (50 steps, guidance 7.5).
SD_DEFAULTS: dict[str, Any] = {
    "concept": "nudity", "num_pairs": 800, "data_steps": 50, "data_guidance": 7.5, "steps": 100,
    "batch_size": 8, "lr": 1e-5, "remain_weight": 1.6, "margin": 1.1, "eval_steps": 50, "eval_guidance": 7.5,
}
# Class-conditional models (a user's checkpoint) start from the CIFAR-10 reference recipe (PAPER.md
# §1-2): Adam lr 1e-5, batch 64, 782 steps, λ 5, element-wise cap α 0.1; DDIM 50 steps, no guidance.
CLASS_DEFAULTS: dict[str, Any] = {
    "steps": 782, "batch_size": 64, "lr": 1e-5, "remain_weight": 5.0, "forget_cap": "elementwise", "alpha": 0.1,
    "eval_steps": 50, "eval_guidance": 1.0,
}
# The embedded class-conditional world's values, tuned with `diffunlearn sweep` on class "zero" with
# evaluation seeds the demo never uses (eval_seed=7; README "Class-conditional track").
CLASS_WORLD_DEFAULTS: dict[str, Any] = {
    **CLASS_DEFAULTS, "steps": 100, "batch_size": 32, "lr": 5e-4, "eval_steps": 20, "eval_guidance": 2.0,
}
CHOICES = {
    "selection": ("full", "cross-attention", "non-cross-attention", "lora"),
    "mixed_precision": ("no", "bf16", "fp16"),
    "optimizer": ("adam", "adam8bit"),
    "device": ("auto", "cpu", "cuda"),
    "save": ("auto", "pipeline", "unet", "lora"),
    "diversity": ("diverse", "uniform"),
    "forget_cap": ("hinge", "elementwise", "none"),
    "margin_mode": ("absolute", "relative"),
    "eval_split": ("test", "train"),
}
POSITIVE_INT = ("num_pairs", "data_steps", "steps", "batch_size", "eval_prompts", "eval_steps", "lora_rank",
                "micro_batches", "remain_per_class")
NON_NEGATIVE = ("threads", "remain_weight", "margin", "alpha", "max_grad_norm", "data_guidance", "eval_guidance",
                "checkpoint_every", "resolution", "lora_alpha", "sample_batch_size", "esd_eta")


FLOAT32_MAX = 3.4028234663852886e38
PATH_KEYS = ("model", "data_dir", "images")  # local paths among the keys (a hub id or embedded name stays as given)


def _coerce(name: str, value: Any, errors: list[str]) -> Any:
    kind = FIELDS[name].type
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "false", "yes", "no", "1", "0"):
            return str(value).lower() in ("true", "yes", "1")
        errors.append(f"`{name}` must be true or false, got {value!r}")
        return FIELDS[name].default
    try:
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(value, bool):
            # YAML 1.1 reads a bare no/yes/off/on in a config file as a boolean; the string was meant.
            return "no" if value is False else "yes"
        return str(value)
    except (TypeError, ValueError):
        errors.append(f"`{name}` must be {'an integer' if kind == 'int' else 'a number'}, got {value!r}")
        return FIELDS[name].default


def build_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                 base: dict[str, Any] | None = None) -> UnlearnConfig:
    """Defaults, then the method's tuned defaults, then ``base`` values, then a YAML file, then
    ``key=value`` overrides; validated.

    Raises:
        UserError: listing every problem found (unknown keys, wrong types, bad values, bad YAML).
    """
    values: dict[str, Any] = dict(base or {})
    errors: list[str] = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {p} does not exist; "
                            "pass the path of a YAML file such as configs/digits-rg.yaml")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            where = f" at line {line + 1}" if line is not None else ""
            raise UserError(f"config file {p} is not valid YAML{where}; fix the syntax (key: value per line)") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"config file {p} must be a mapping of keys to values, got a {type(loaded).__name__}")
        for key in PATH_KEYS:
            # A config.yaml written before paths were stored resolved: a relative path that is not
            # there from the current directory is read relative to the file's own folder.
            value = loaded.get(key)
            if (isinstance(value, str) and value and not value.startswith(("embedded:", "~", "/"))
                    and not Path(value).exists() and (p.parent / value).exists()):
                loaded[key] = str((p.parent / value).resolve())
        values.update(loaded)
    for item in overrides or []:
        if "=" not in item:
            errors.append(f"override {item!r} is not of the form key=value")
            continue
        key, raw = item.split("=", 1)
        key = key.strip()
        if key in FIELDS and FIELDS[key].type == "str":
            values[key] = raw  # kept verbatim: YAML would read `mixed_precision=no` as false
        else:
            values[key] = yaml.safe_load(raw) if raw.strip() else raw
    from .methods import METHODS

    method = values.get("method", UnlearnConfig.method)
    variant = METHODS[method].variant if method in METHODS else {}
    kind = model_kind(str(values.get("model", UnlearnConfig.model)))
    if kind == "class":
        recipe = CLASS_WORLD_DEFAULTS if str(values.get("model")) == EMBEDDED_CLASS else CLASS_DEFAULTS
        values = {**recipe, **variant, **values}
    elif kind == "text":
        values = {**SD_DEFAULTS, **variant, **values}
    elif method in METHODS:
        # Method defaults were tuned in the digit world (README "Tuning"), so they apply only there.
        concept = str(values.get("concept", UnlearnConfig.concept))
        values = {**METHODS[method].defaults_for(concept), **variant, **values}
    unknown = sorted(k for k in values if k not in FIELDS)
    for key in unknown:
        close = difflib.get_close_matches(key, list(FIELDS), n=1, cutoff=0.6)
        errors.append(f"unknown key `{key}`" + (f" (did you mean `{close[0]}`?)" if close else ""))
    if unknown:
        errors.append("`diffunlearn config` lists every key with its default")
    kwargs = {k: _coerce(k, v, errors) for k, v in values.items() if k in FIELDS}
    for key in PATH_KEYS:
        # Stored resolved, so the run's config.yaml means the same from any directory (eval, --resume).
        value = kwargs.get(key)
        if isinstance(value, str) and value and not value.startswith("embedded:") and Path(value).expanduser().exists():
            kwargs[key] = str(Path(value).expanduser().resolve())
    cfg = UnlearnConfig(**kwargs)
    errors.extend(validate(cfg))
    if errors:
        raise UserError("invalid configuration: " + "; ".join(errors))
    return cfg


def _missing_path(model: str) -> bool:
    """A local path (absolute, relative with ./ or ~, or nested deeper than a hub id's org/name) that
    does not exist: its kind cannot be known, so only the loader's "does not exist" is reported."""
    path_like = model.startswith(("/", ".", "~")) or model.count("/") > 1
    return path_like and not Path(model).expanduser().exists()


def validate(cfg: UnlearnConfig) -> list[str]:
    """Every problem with ``cfg`` (method and concept names are checked where they are resolved)."""
    from .methods import METHODS

    errors = []
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        # NaN passes every `< 0` test and inf every `> 0` test, then poisons the weights mid-run.
        if isinstance(value, float) and not math.isfinite(value):
            errors.append(f"`{field.name}` must be a finite number, got {value}")
        elif isinstance(value, float) and abs(value) > FLOAT32_MAX:
            # Finite in Python, inf once it meets float32 weights (Adam itself fails on lr=1e39).
            errors.append(f"`{field.name}` must be within the float32 range (|x| < 3.4e38), got {value}")
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            errors.append(f"`{name}` must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    for name in POSITIVE_INT:
        if getattr(cfg, name) < 1:
            errors.append(f"`{name}` must be a positive integer, got {getattr(cfg, name)}")
    for name in NON_NEGATIVE:
        if getattr(cfg, name) < 0:
            errors.append(f"`{name}` must be >= 0, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        errors.append(f"`lr` must be > 0, got {cfg.lr}")
    kind = model_kind(cfg.model)
    if kind == "pixel":
        from .worlds.digits import COLOURS, DIGITS

        if cfg.selection == "lora":
            errors.append("`selection: lora` is available for Stable Diffusion models only; for the digit-world "
                          "model use full, cross-attention or non-cross-attention")
        if cfg.concept not in DIGITS + COLOURS:
            errors.append(f"unknown concept {cfg.concept!r}: the digit world can forget a digit "
                          f"({', '.join(DIGITS)}) or a colour ({', '.join(COLOURS)})")
    if kind == "class":
        # Class names come from the model (checked when its data is built); the selection can be checked now.
        if cfg.selection in ("lora", "cross-attention"):
            errors.append(f"`selection: {cfg.selection}` does not apply to a class-conditional UNet (it has no "
                          "cross-attention and no LoRA format here); use selection=full")
        if cfg.model == EMBEDDED_CLASS:
            from .worlds.digits import DIGITS

            if cfg.concept not in DIGITS:
                errors.append(f"unknown class {cfg.concept!r}: the embedded class-conditional model's classes are "
                              f"{', '.join(DIGITS)}")
    elif kind == "text" and Path(cfg.model).expanduser().is_dir() and not (
            Path(cfg.model).expanduser() / "model_index.json").is_file():
        errors.append(f"{cfg.model} has no model_index.json, so it is not a model folder; pass a folder written by "
                      "`diffunlearn world train-base` or a run (its model/), or a diffusers pipeline folder")
    elif kind == "text" and not _missing_path(cfg.model):
        # (A model path that does not exist is reported by the loader, which says what to pass instead.)
        from .data.templates import TEMPLATES

        if cfg.concept not in TEMPLATES:
            errors.append(f"unknown concept {cfg.concept!r} for a Stable Diffusion model; choose one of: "
                          f"{', '.join(TEMPLATES)}")
    if cfg.save == "lora" and cfg.selection != "lora":
        errors.append("`save: lora` needs `selection: lora`; use save=pipeline or save=unet for other selections")
    targets = [t for t in cfg.lora_targets.split(",") if t.strip()]
    if cfg.selection == "lora" and not targets:
        errors.append("`lora_targets` is empty; name the modules LoRA wraps, e.g. to_q,to_k,to_v,to_out.0")
    if cfg.optimizer == "adam8bit":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            errors.append("optimizer adam8bit needs bitsandbytes; install it with `pip install 'diffunlearn[8bit]'` "
                          "or use optimizer=adam")
    if cfg.method not in METHODS:
        errors.append(f"unknown method {cfg.method!r}; choose one of: {', '.join(METHODS)}")
    else:
        errors.extend(METHODS[cfg.method].validate(cfg))  # the method's own settings, in the same message
    return errors


def field_comments() -> dict[str, str]:
    """The comment beside each field in :class:`UnlearnConfig`'s source (its documentation), plus
    ``"# --- section ---"`` lines keyed by the first field after them as ``"§" + field``."""
    import inspect
    import re

    comments: dict[str, str] = {}
    section = None
    for line in inspect.getsource(UnlearnConfig).splitlines():
        if m := re.match(r"\s+# --- (.+) ---", line):
            section = m.group(1)
        elif m := re.match(r"\s+(\w+): \w+ = .*?#\s?(.*)$", line):
            comments[m.group(1)] = m.group(2).strip()
            if section:
                comments["§" + m.group(1)] = section
                section = None
    return comments


def commented_yaml(cfg: UnlearnConfig) -> str:
    """``cfg`` as YAML with each key's documentation beside it (``diffunlearn config``): a valid config
    file to start from."""
    comments = field_comments()
    lines = []
    for name, value in cfg.to_dict().items():
        if "§" + name in comments:
            lines.append(f"{'' if not lines else chr(10)}# --- {comments['§' + name]} ---")
        text = yaml.safe_dump({name: value}, default_flow_style=False).strip()
        lines.append(f"{text:40s} # {comments.get(name, '')}".rstrip())
    return "\n".join(lines) + "\n"


def dump_config(cfg: UnlearnConfig, path: str | os.PathLike, command: str) -> None:
    """Write the resolved config as YAML whose first line is the command that reproduces it."""
    text = f"# {command}\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    Path(path).write_text(text)
