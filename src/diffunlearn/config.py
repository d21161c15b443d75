"""Typed run configuration: commented defaults as plain Python, YAML files and ``key=value``
overrides on top, every problem reported at once (torchtune's ``validate`` idea).

The schema (keys, types, defaults, ranges) lives in :mod:`diffunlearn.core.schema`; this module
resolves a config for its model family (the family's recipe, :mod:`diffunlearn.families`), its
method (tuned defaults, variant) and its concept, and validates what the values mean there.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml

from .core.schema import (  # noqa: F401  (the schema's names are re-exported: `from diffunlearn.config import ...`)
    CHOICES,
    FIELDS,
    FLOAT32_MAX,
    NON_NEGATIVE,
    PATH_KEYS,
    POSITIVE_INT,
    UnlearnConfig,
    check_values,
    coerce,
    commented_yaml,
    dump_config,
    field_comments,
)
from .errors import UserError
from .families import (  # noqa: F401  (re-exported)
    CLASS_DEFAULTS,
    CLASS_WORLD_DEFAULTS,
    EMBEDDED,
    EMBEDDED_CLASS,
    RECIPES,
    SD_DEFAULTS,
    TEXT_FAMILIES,
    model_kind,
)


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
    concept = values.get("concept")
    if isinstance(concept, str) and concept.startswith("@"):
        # A file of concepts, one per line (blank lines and # comments skipped): the run's concept list,
        # recorded in config.yaml as the list itself so the run stays reproducible without the file.
        path = Path(concept[1:]).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            raise UserError(f"concept file {path} cannot be read; pass an existing text file with one concept per "
                            "line (concept=@concepts.txt) or list them (concept=three,red)") from None
        values["concept"] = ",".join(x.split("#")[0].strip() for x in lines if x.split("#")[0].strip())
    from .methods import METHODS

    method = values.get("method", UnlearnConfig.method)
    variant = METHODS[method].variant if method in METHODS else {}
    kind = model_kind(str(values.get("model", UnlearnConfig.model)))
    if kind == "class":
        if str(values.get("model")) == EMBEDDED_CLASS:
            own = METHODS[method].class_world_defaults if method in METHODS else {}
            recipe = {**CLASS_WORLD_DEFAULTS, **own}
        else:
            recipe = CLASS_DEFAULTS
        values = {**recipe, **variant, **values}
    elif kind in RECIPES:
        values = {**RECIPES[kind], **variant, **values}
    elif method in METHODS:
        # Method defaults were tuned in the digit world (README "Tuning"), so they apply only there.
        concept = str(values.get("concept", UnlearnConfig.concept))
        defaults = METHODS[method].defaults_for(concept)
        if "remain_neighbours" in defaults and _neighbours_problem(
                str(values.get("diversity", UnlearnConfig.diversity)),
                [c.strip() for key in ("concept", "remain_excludes")
                 for c in str(values.get(key, getattr(UnlearnConfig, key))).split(",")]):
            del defaults["remain_neighbours"]  # a colour default that cannot apply is left out, not refused
        values = {**defaults, **variant, **values}
    unknown = sorted(k for k in values if k not in FIELDS)
    for key in unknown:
        close = difflib.get_close_matches(key, list(FIELDS), n=1, cutoff=0.6)
        errors.append(f"unknown key `{key}`" + (f" (did you mean `{close[0]}`?)" if close else ""))
    if unknown:
        errors.append("`diffunlearn config` lists every key with its default")
    kwargs = {k: coerce(k, v, errors) for k, v in values.items() if k in FIELDS}
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


def _neighbours_problem(diversity: str, listed: list[str]) -> str | None:
    """Why a colour's remain prompts cannot name another colour (``remain_neighbours``), or None:
    they need diverse pairs, and a colour that no concept (``listed``: concepts and excludes) lists."""
    from .worlds.digits import COLOURS

    if diversity != "diverse":
        return ("`remain_neighbours` needs diversity=diverse (the uniform set has one remain prompt); "
                "set remain_neighbours=0 or diversity=diverse")
    if not set(COLOURS) - set(listed):
        return ("`remain_neighbours` names a colour no concept lists, and these concepts list every colour; "
                "set remain_neighbours=0")
    return None


def _missing_path(model: str) -> bool:
    """A local path (absolute, relative with ./ or ~, or nested deeper than a hub id's org/name) that
    does not exist: its kind cannot be known, so only the loader's "does not exist" is reported."""
    path_like = model.startswith(("/", ".", "~")) or model.count("/") > 1
    return path_like and not Path(model).expanduser().exists()


def validate(cfg: UnlearnConfig) -> list[str]:
    """Every problem with ``cfg``: its values (:func:`core.schema.check_values`), then what they mean
    for the model family, the concept and the method (each method checks its own settings)."""
    from .methods import METHODS

    errors = check_values(cfg)
    kind = model_kind(cfg.model)
    if kind == "pixel":
        from .worlds.digits import COLOURS, DIGITS

        if cfg.selection == "lora":
            errors.append("`selection: lora` is available for Stable Diffusion models only; for the digit-world "
                          "model use full, cross-attention or non-cross-attention")
        for concept in cfg.concepts + cfg.excluded:
            if concept not in DIGITS + COLOURS:
                errors.append(f"unknown concept {concept!r}: the digit world can forget a digit "
                              f"({', '.join(DIGITS)}) or a colour ({', '.join(COLOURS)})")
        if len(set(cfg.concepts + cfg.excluded) & set(DIGITS)) >= len(DIGITS) - 1:
            errors.append("a several-concept run must leave at least two digits unlisted (the remain prompts "
                          "replace a listed digit by an unlisted one)")
    if kind == "class" and len(cfg.concepts) > 1:
        errors.append("a class-conditional run forgets one class; run one class per request (several concepts at "
                      "once are for the text-to-image models)")
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
    elif kind in TEXT_FAMILIES and Path(cfg.model).expanduser().is_dir() and not (
            Path(cfg.model).expanduser() / "model_index.json").is_file():
        errors.append(f"{cfg.model} has no model_index.json, so it is not a model folder; pass a folder written by "
                      "`diffunlearn world train-base` or a run (its model/), or a diffusers pipeline folder")
    elif kind in TEXT_FAMILIES and not _missing_path(cfg.model):
        # (A model path that does not exist is reported by the loader, which says what to pass instead.)
        from .data.templates import TEMPLATES

        for concept in cfg.concepts:
            if concept not in TEMPLATES:
                errors.append(f"unknown concept {concept!r} for a Stable Diffusion model; choose one of: "
                              f"{', '.join(TEMPLATES)}")
    if cfg.offload_encoders and kind not in TEXT_FAMILIES:
        errors.append("`offload_encoders` is for the diffusers families (SD, SDXL, SD3, FLUX); the digit-world "
                      "models share one small frozen encoder: set offload_encoders=false")
    if cfg.save == "lora" and cfg.selection != "lora":
        errors.append("`save: lora` needs `selection: lora`; use save=pipeline or save=unet for other selections")
    if cfg.lora_base_dtype != "fp32" and cfg.selection != "lora":
        errors.append(f"`lora_base_dtype: {cfg.lora_base_dtype}` holds a LoRA run's frozen base in half precision; "
                      "set selection=lora with it, or lora_base_dtype=fp32 (trained weights stay fp32)")
    elif cfg.lora_base_dtype != "fp32" and cfg.mixed_precision != cfg.lora_base_dtype:
        errors.append(f"`lora_base_dtype: {cfg.lora_base_dtype}` needs the matching autocast: set "
                      f"mixed_precision={cfg.lora_base_dtype} (it is {cfg.mixed_precision})")
    elif cfg.lora_base_dtype != "fp32" and cfg.save in ("pipeline", "unet"):
        errors.append(f"`save: {cfg.save}` would write the {cfg.lora_base_dtype}-rounded base weights; use save=lora "
                      "(the adapters, on the untouched base) with lora_base_dtype, or lora_base_dtype=fp32")
    targets = [t for t in cfg.lora_targets.split(",") if t.strip()]
    if cfg.selection == "lora" and not targets:
        errors.append("`lora_targets` is empty; name the modules LoRA wraps, e.g. to_q,to_k,to_v,to_out.0")
    if cfg.optimizer == "adam8bit":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            errors.append("optimizer adam8bit needs bitsandbytes; install it with `pip install 'diffunlearn[8bit]'` "
                          "or use optimizer=adam")
    if cfg.remain_neighbours:
        from .worlds.digits import COLOURS

        if kind != "pixel":
            errors.append("`remain_neighbours` changes the digit world's remain prompts for a colour concept; "
                          "for this model set remain_neighbours=0")
        elif not set(cfg.concepts) & set(COLOURS):
            errors.append(f"`remain_neighbours` is for a colour concept, and {cfg.concept!r} names none (a digit's "
                          "remain prompts already name another digit); set remain_neighbours=0")
        elif problem := _neighbours_problem(cfg.diversity, cfg.concepts + cfg.excluded):
            errors.append(problem)
    if cfg.early_stop_every and not (kind == "pixel" or cfg.model == EMBEDDED_CLASS):
        errors.append("`early_stop_every` scores the forget prompts with the embedded worlds' oracle during training, "
                      "so it is for the digit-world and embedded class models; set early_stop_every=0 and choose "
                      "`steps` for this model (e.g. with `diffunlearn study`)")
    if cfg.early_stop_every and cfg.method in METHODS and METHODS[cfg.method].procedure is not None:
        errors.append(f"method {cfg.method} takes no gradient steps, so there is nothing to stop early; set "
                      "early_stop_every=0")
    if cfg.method not in METHODS:
        errors.append(f"unknown method {cfg.method!r}; choose one of: {', '.join(METHODS)}")
    else:
        errors.extend(METHODS[cfg.method].validate(cfg))  # the method's own settings, in the same message
    return errors


