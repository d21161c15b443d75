"""The run configuration's schema: every key with its type, default and comment (plain Python),
the choices and ranges a value must respect, and the YAML form a run folder records. Nothing here
knows a model family, a concept or a method; ``diffunlearn.config`` resolves and validates those."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import yaml

from ..families import EMBEDDED


@dataclasses.dataclass
class UnlearnConfig:
    """Everything one unlearning run needs. Defaults are the digit world's tuned values (README)."""

    # --- model and concept ---
    model: str = EMBEDDED          # a model folder, "embedded:digits" or "embedded:digits-class" (committed models)
    concept: str = "three"         # the word to forget (a digit or colour, a class, a template); several: three,red
    method: str = "rg"             # a key of diffunlearn.methods.METHODS
    selection: str = "full"        # trainable UNet parameters: full, cross-attention, non-cross-attention, lora
    lora_rank: int = 4             # LoRA rank (selection "lora", through peft)
    lora_alpha: float = 4.0        # LoRA scaling alpha
    lora_targets: str = "to_q,to_k,to_v,to_out.0"  # comma-separated module names LoRA wraps
    lora_base_dtype: str = "fp32"  # LoRA: dtype of the frozen base weights; bf16/fp16 halve them (adapters stay fp32)
    # --- data (PAPER.md §3) ---
    diversity: str = "diverse"     # "diverse" (paired templates) or "uniform" (one prompt each, repeated)
    remain_neighbours: float = 0.0 # colour concept (digit world): share of remain prompts naming another colour
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
    uce_guide: str = ""            # UCE: the text whose old keys/values the erased words now map to ("" = empty prompt)
    uce_preserve: str = ""         # UCE: comma-separated texts whose keys/values are kept (e.g. other artists)
    uce_erase_scale: float = 1.0   # UCE: weight e of the erased words in the least-squares edit
    uce_preserve_scale: float = 1.0  # UCE: weight p of the preserved texts
    uce_lambda: float = 0.5        # UCE: weight λ of staying near the original projection (the reference's lamb)
    remain_excludes: str = ""      # digit world: concepts no training prompt may show (earlier requests of a lineage)
    forget_batches: str = "joint"  # several concepts: "joint" (all every step) or "interleaved" (one a step)
    seed: int = 0                  # batch order, noise and timesteps
    early_stop_every: int = 0      # every N steps score the TRAINING forget prompts, stop once forgotten; 0 = never
    early_stop_score: float = 0.05 # early_stop_every stops at this forget score or below (class world: 1 − UA)
    early_stop_prompts: int = 32   # forget prompts (class world: forget-class images) sampled per early-stop check
    # --- memory, speed and faults ---
    mixed_precision: str = "no"    # "no", "bf16" or "fp16" autocast; trainable weights stay fp32 (master copy)
    gradient_checkpointing: bool = False  # recompute UNet activations in backward: less memory, ~30% slower
    optimizer: str = "adam"        # "adam" or "adam8bit" (bitsandbytes, the `8bit` extra)
    offload_encoders: bool = False # SD/SDXL/SD3/FLUX: text encoders wait on the CPU between (cached) encodings
    device: str = "auto"           # "auto" (CUDA when present), "cpu" or "cuda"
    threads: int = 0               # torch CPU threads of this process; 0 = torch's default (one per core)
    checkpoint_every: int = 0      # write a resumable checkpoint every N steps; 0 = never
    # Off by default: its two extra forward passes cost a quarter of an rg step (the embedded demo:
    # 174 s of training, 43 s of it the diagnostic).
    diagnose: bool = False         # log each step's realised loss change (both_improved_fraction; two extra forwards)
    save: str = "auto"             # "pipeline", "unet", "lora" or "auto" (lora for selection lora, else pipeline)
    # --- evaluation ---
    eval_prompts: int = 100        # held-out prompts per set (forget and remain)
    eval_seed: int = 1             # image i of an evaluation set uses eval_seed * 100000 + i
    eval_split: str = "test"       # digit world: "test" = held-out vocabulary (reports), "train" = tuning vocabulary
    eval_steps: int = 12            # sampler steps of the evaluation images
    eval_guidance: float = 4.0     # classifier-free guidance of the evaluation images

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def excluded(self) -> list[str]:
        """The concepts of ``remain_excludes``."""
        return [c.strip() for c in self.remain_excludes.split(",") if c.strip()]

    @property
    def concepts(self) -> list[str]:
        """The concepts of ``concept`` (one, or several separated by commas), in the order given."""
        return [c.strip() for c in self.concept.split(",") if c.strip()]


FIELDS = {f.name: f for f in dataclasses.fields(UnlearnConfig)}

CHOICES = {
    "selection": ("full", "cross-attention", "non-cross-attention", "lora"),
    "mixed_precision": ("no", "bf16", "fp16"),
    "lora_base_dtype": ("fp32", "bf16", "fp16"),
    "optimizer": ("adam", "adam8bit"),
    "device": ("auto", "cpu", "cuda"),
    "save": ("auto", "pipeline", "unet", "lora"),
    "diversity": ("diverse", "uniform"),
    "forget_cap": ("hinge", "elementwise", "none"),
    "margin_mode": ("absolute", "relative"),
    "eval_split": ("test", "train"),
    "forget_batches": ("joint", "interleaved"),
}
POSITIVE_INT = ("num_pairs", "data_steps", "steps", "batch_size", "eval_prompts", "eval_steps", "lora_rank",
                "micro_batches", "remain_per_class", "early_stop_prompts")
NON_NEGATIVE = ("threads", "remain_weight", "margin", "alpha", "max_grad_norm", "data_guidance", "eval_guidance",
                "checkpoint_every", "resolution", "lora_alpha", "sample_batch_size", "esd_eta",
                "uce_erase_scale", "uce_preserve_scale", "uce_lambda", "early_stop_every")


FLOAT32_MAX = 3.4028234663852886e38
PATH_KEYS = ("model", "data_dir", "images")  # local paths among the keys (a hub id or embedded name stays as given)


def coerce(name: str, value: Any, errors: list[str]) -> Any:
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



def check_values(cfg: UnlearnConfig) -> list[str]:
    """Every problem of ``cfg``'s values on their own: finite numbers, choices, ranges. What a value
    means for a model family, a concept or a method is checked by ``diffunlearn.config.validate``."""
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
    if not 0 <= cfg.early_stop_score < 1:
        errors.append(f"`early_stop_score` is a forget score, so it must be in [0, 1), got {cfg.early_stop_score}")
    if cfg.lr <= 0:
        errors.append(f"`lr` must be > 0, got {cfg.lr}")
    if not 0 <= cfg.remain_neighbours <= 1:
        errors.append(f"`remain_neighbours` is a fraction of the remain prompts, so it must be in [0, 1], "
                      f"got {cfg.remain_neighbours}")
    concepts = cfg.concepts
    if set(cfg.excluded) & set(concepts):
        errors.append(f"`remain_excludes` repeats a concept of `concept` ({cfg.remain_excludes!r}); list each once")
    if not concepts or len(concepts) != len(cfg.concept.split(",")):
        errors.append(f"`concept` must name one concept or several separated by commas, got {cfg.concept!r}")
    elif len(set(concepts)) != len(concepts):
        errors.append(f"`concept` lists a concept twice: {cfg.concept!r}")
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
