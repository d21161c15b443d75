"""Evaluation prompt sets: prompt files (JSON, TXT, I2P-style CSV) and the built-in held-out sets.

A :class:`PromptSet` carries, per prompt, an optional seed and guidance scale; ``None`` means "the
caller's default for index i", so a file that records neither (TXT) and one that records both (the
I2P CSV with ``evaluation_seed`` and ``evaluation_guidance``) go through the same code.

Specs accepted by :func:`resolve_prompt_sets`:

* a file path (``.json``, ``.txt``, ``.csv``); the set is named after the file stem (``i2p.csv`` ->
  ``i2p``);
* ``template:CONCEPT[:SPLIT[:forget|remain[:N]]]``: the paper's template prompts
  (``diffunlearn.data.templates``), by default the held-out test split, forget side, 100 prompts;
* ``world:CONCEPT[:SPLIT[:forget|remain[:N]]]``: the digit world's evaluation captions
  (``diffunlearn.data.prompts.eval_sets``), same defaults;
* ``class:NAME[,NAME...][:N]``: N copies of each class name, for class-conditional models
  (``forget`` for one class, ``remain`` for several);
* ``NAME=SPEC``: any of the above under another name. Built-in sets are named after their side
  (``forget`` / ``remain``), the names ``diffunlearn compare`` looks for, so evaluating two sets of
  the same side needs a name for one, e.g. ``remain-train=template:nudity:train:remain:800``.

Every problem with a user's file raises :class:`~diffunlearn.errors.UserError` naming the file and
the 1-based line.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import hashlib
import io
import json
import math
import re
from pathlib import Path
from typing import Any

from ..errors import UserError

DEFAULT_SPLIT = "test"
DEFAULT_WHICH = "forget"
DEFAULT_N = 100
# Seeds must fit torch.Generator.manual_seed, which takes values in [0, 2**64).
_MAX_SEED = 2**64
# Column names honoured in CSV files: the ESD/I2P evaluation layout first, then the Hugging Face
# I2P dataset's own columns as a fallback.
_SEED_COLUMNS = ("evaluation_seed", "sd_seed")
_GUIDANCE_COLUMNS = ("evaluation_guidance", "sd_guidance")
# Keys honoured in JSON objects, in order of preference.
_SEED_KEYS = ("seed", "evaluation_seed")
_GUIDANCE_KEYS = ("guidance", "evaluation_guidance")
_FORMATS = (".json", ".txt", ".csv")
_JSON_WS = re.compile(r"[ \t\n\r]*")


@dataclasses.dataclass
class PromptSet:
    """Prompts to evaluate, with per-prompt seed and guidance (``None`` = caller's default for index i).

    Attributes:
        name: unique name under which results are filed (file stem, or e.g. ``nudity-test-forget``).
        prompts: non-empty prompt strings.
        seeds, guidances: same length as ``prompts``.
        source: where the prompts came from (file path or the spec that built them).
        sha256: hex sha256 of the file bytes, or of the UTF-8 prompts joined by newlines for a
            built-in set, so a report can tell whether two runs used the same prompts.
    """

    name: str
    prompts: list[str]
    seeds: list[int | None]
    guidances: list[float | None]
    source: str
    sha256: str

    def __post_init__(self) -> None:
        """Raises ValueError when the per-prompt lists differ in length (a caller bug)."""
        if not (len(self.prompts) == len(self.seeds) == len(self.guidances)):
            raise ValueError(f"prompt set {self.name!r}: {len(self.prompts)} prompts, {len(self.seeds)} seeds, "
                             f"{len(self.guidances)} guidances; they must match")

    def __len__(self) -> int:
        return len(self.prompts)


# ----------------------------------------------------------------------------------------------
# Value parsing shared by the formats


def _parse_seed(value: Any, where: str) -> int | None:
    """A seed from JSON (int/float/str/null) or CSV (str); empty or null means "default".

    Integral floats ("42.0") are accepted because spreadsheet and pandas exports write them.

    Raises:
        UserError: not a whole number in [0, 2**64).
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    seed: int | None = None
    if isinstance(value, bool):
        seed = None
    elif isinstance(value, int):
        seed = value
    elif isinstance(value, float) and value.is_integer():
        seed = int(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seed = int(text)
        except ValueError:
            try:
                as_float = float(text)
            except ValueError:
                as_float = math.nan
            if math.isfinite(as_float) and as_float.is_integer():
                seed = int(as_float)
    if seed is None or not 0 <= seed < _MAX_SEED:
        raise UserError(f"{where}: seed {value!r} is not a whole number in [0, 2**64); "
                        "fix it or leave it empty to use the default seed.")
    return seed


def _parse_guidance(value: Any, where: str) -> float | None:
    """A guidance scale from JSON or CSV; empty or null means "default".

    Raises:
        UserError: not a finite number >= 0.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    guidance = math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        guidance = float(value)
    elif isinstance(value, str):
        try:
            guidance = float(value.strip())
        except ValueError:
            pass
    if not (math.isfinite(guidance) and guidance >= 0):
        raise UserError(f"{where}: guidance {value!r} is not a finite number >= 0; "
                        "fix it (e.g. 7.5) or leave it empty to use the default guidance.")
    return guidance


def _decode(path: Path, data: bytes) -> str:
    """UTF-8 text of a prompt file; a leading BOM (written by Excel) is dropped.

    Raises:
        UserError: invalid UTF-8 (names the line), or no content at all.
    """
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path} line {line} is not valid UTF-8 (byte 0x{data[e.start]:02x}); "
                        "re-save the file with UTF-8 encoding.") from None
    if not text.strip():
        raise UserError(f"{path} is empty (line 1); put prompts in it: one per line (.txt), "
                        "a JSON list (.json), or a CSV with a 'prompt' column (.csv).")
    return text


# ----------------------------------------------------------------------------------------------
# Formats: each returns (prompts, seeds, guidances)

_Rows = tuple[list[str], list[int | None], list[float | None]]


def _read_txt(path: Path, text: str) -> _Rows:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    prompts: list[str] = []
    # split("\n") rather than splitlines(): the latter also breaks on \x0b, \x1c, U+2028..., which
    # would make reported line numbers disagree with an editor's.
    for raw in text.split("\n"):
        line = raw.strip()
        if line and not line.startswith("#"):
            prompts.append(line)
    if not prompts:
        raise UserError(f"{path} has no prompts (line 1 onwards is blank or # comments); "
                        "add one prompt per line.")
    return prompts, [None] * len(prompts), [None] * len(prompts)


def _json_item_lines(text: str) -> list[int]:
    """1-based line on which each element of a top-level JSON array starts.

    Called only on text that ``json.loads`` accepted as a list, so the scan cannot fail.
    """
    decoder = json.JSONDecoder()
    lines: list[int] = []
    line, counted_to = 1, 0
    i = _JSON_WS.match(text, 0).end() + 1  # past "["
    i = _JSON_WS.match(text, i).end()
    if text[i] == "]":
        return lines
    while True:
        i = _JSON_WS.match(text, i).end()
        line += text.count("\n", counted_to, i)  # incremental: linear in the file size
        counted_to = i
        lines.append(line)
        _, i = decoder.raw_decode(text, i)
        i = _JSON_WS.match(text, i).end()
        if text[i] != ",":
            return lines
        i += 1


def _first_key(item: dict[str, Any], keys: tuple[str, ...]) -> Any:
    """Value of the first key of ``keys`` present in ``item`` (None if none is)."""
    for key in keys:
        if key in item:
            return item[key]
    return None


def _read_json(path: Path, text: str) -> _Rows:
    """A list of strings, or of objects with ``prompt`` and optional ``seed``/``evaluation_seed``
    and ``guidance``/``evaluation_guidance``; other keys are ignored."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} line {e.lineno} column {e.colno} is not valid JSON ({e.msg}); "
                        "fix the syntax there.") from None
    if not isinstance(data, list):
        raise UserError(f"{path} line 1 holds a JSON {type(data).__name__}, not a list; "
                        'write a list of prompts, e.g. ["a cat", {"prompt": "a dog", "seed": 1}].')
    if not data:
        raise UserError(f"{path} is an empty JSON list (line 1); add prompts to it.")
    prompts: list[str] = []
    seeds: list[int | None] = []
    guidances: list[float | None] = []
    for item, line in zip(data, _json_item_lines(text)):
        where = f"{path} line {line}"
        if isinstance(item, str):
            prompt, seed, guidance = item, None, None
        elif isinstance(item, dict):
            prompt = item.get("prompt")
            if not isinstance(prompt, str):
                raise UserError(f'{where}: the object has no "prompt" string (keys: {", ".join(item) or "none"}); '
                                'add a "prompt" key.')
            seed = _parse_seed(_first_key(item, _SEED_KEYS), where)
            guidance = _parse_guidance(_first_key(item, _GUIDANCE_KEYS), where)
        else:
            raise UserError(f'{where}: a JSON {type(item).__name__} is neither a prompt string nor an object; '
                            'use "text" or {"prompt": "text"}.')
        if not prompt.strip():
            raise UserError(f"{where}: the prompt is empty; write a prompt or remove the entry.")
        prompts.append(prompt.strip())
        seeds.append(seed)
        guidances.append(guidance)
    return prompts, seeds, guidances


def _read_csv(path: Path, text: str) -> _Rows:
    """The I2P layout: a header with ``prompt``; ``evaluation_seed``/``evaluation_guidance`` (or the
    Hugging Face I2P ``sd_seed``/``sd_guidance``) honoured when present; other columns ignored."""
    # strict: an unterminated quote would otherwise swallow the rest of the file into one prompt.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except csv.Error as e:
        raise UserError(f"{path} line {reader.line_num}: {e}; fix the CSV quoting there.") from None
    columns = [c.strip() for c in header]
    lowered = [c.lower() for c in columns]
    if "prompt" not in lowered:
        found = ", ".join(repr(c) for c in columns if c) or "none"
        raise UserError(f"{path} line 1 has no 'prompt' column (found: {found}); "
                        "name the column holding the prompts 'prompt'.")
    prompt_col = lowered.index("prompt")
    seed_col = next((lowered.index(c) for c in _SEED_COLUMNS if c in lowered), None)
    guidance_col = next((lowered.index(c) for c in _GUIDANCE_COLUMNS if c in lowered), None)

    def cell(row: list[str], col: int | None) -> str | None:
        # Short rows (trailing cells omitted) read as empty cells.
        return row[col] if col is not None and col < len(row) else None

    prompts: list[str] = []
    seeds: list[int | None] = []
    guidances: list[float | None] = []
    end_of_previous = reader.line_num
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise UserError(f"{path} line {end_of_previous + 1}: {e}; fix the CSV quoting there.") from None
        line = end_of_previous + 1  # a quoted prompt may span lines: report where the row starts
        end_of_previous = reader.line_num
        if not any(c.strip() for c in row):
            continue  # blank line
        where = f"{path} line {line}"
        prompt = (cell(row, prompt_col) or "").strip()
        if not prompt:
            raise UserError(f"{where}: the 'prompt' cell is empty; write a prompt or delete the row.")
        prompts.append(prompt)
        seeds.append(_parse_seed(cell(row, seed_col), where))
        guidances.append(_parse_guidance(cell(row, guidance_col), where))
    if not prompts:
        raise UserError(f"{path} has a header (line 1) but no prompt rows; add one row per prompt.")
    return prompts, seeds, guidances


def load_prompt_set(path: str | Path, name: str | None = None) -> PromptSet:
    """Read a prompt file.

    Args:
        path: a ``.json``, ``.txt`` or ``.csv`` file (see the module docstring for the layouts).
        name: the set's name; defaults to the file stem.

    Returns:
        A :class:`PromptSet` whose ``sha256`` is over the file's bytes and whose ``source`` is the path.

    Raises:
        UserError: missing file, unknown extension, invalid UTF-8, empty file, malformed content,
            missing ``prompt`` column or key, bad seed or guidance; each names the file and line.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _FORMATS:
        raise UserError(f"prompt file {path} has an unsupported extension {path.suffix or '(none)'!r}; "
                        "use .json, .txt or .csv.")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"prompt file {path} does not exist; check the path.") from None
    except OSError as e:
        raise UserError(f"prompt file {path} cannot be read ({e.strerror}); check the path and permissions.") from None
    text = _decode(path, data)
    reader = {".json": _read_json, ".txt": _read_txt, ".csv": _read_csv}[suffix]
    prompts, seeds, guidances = reader(path, text)
    return PromptSet(name=name or path.stem, prompts=prompts, seeds=seeds, guidances=guidances,
                     source=str(path), sha256=hashlib.sha256(data).hexdigest())


# ----------------------------------------------------------------------------------------------
# Built-in sets


def _text_sha256(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()


def _check_split_which_n(split: str, which: str, n: int, what: str) -> None:
    """Raises UserError for an unknown split/side or a non-positive count."""
    if split not in ("train", "test"):
        raise UserError(f"{what}: unknown split {split!r}; use train or test.")
    if which not in ("forget", "remain"):
        raise UserError(f"{what}: unknown side {which!r}; use forget or remain.")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"{what}: the prompt count {n!r} must be a positive integer; use e.g. {DEFAULT_N}.")


def template_prompt_set(concept: str, split: str = DEFAULT_SPLIT, n: int = DEFAULT_N, which: str = DEFAULT_WHICH,
                        seed: int = 0) -> PromptSet:
    """The paper's template prompts for a Stable Diffusion concept (PAPER.md §3).

    ``split="test"`` uses the held-out vocabulary disjoint from training; ``which`` picks the forget
    prompts (with the concept word) or their index-paired remain prompts. Named ``which``
    (``forget``/``remain``, the set names ``diffunlearn compare`` reads); seeds and guidances are all ``None``.

    Raises:
        UserError: unknown concept, split or side, or a non-positive ``n``.
    """
    from ..data.templates import TEMPLATES, template_pairs

    what = f"template:{concept}:{split}:{which}:{n}"
    if concept not in TEMPLATES:
        raise UserError(f"{what}: unknown concept {concept!r}; choose one of: {', '.join(TEMPLATES)}.")
    _check_split_which_n(split, which, n, what)
    forget, remain = template_pairs(concept, n, split=split, seed=seed)
    prompts = forget if which == "forget" else remain
    return PromptSet(name=which, prompts=prompts, seeds=[None] * n, guidances=[None] * n,
                     source=what, sha256=_text_sha256(prompts))


def world_prompt_set(concept: str, split: str = DEFAULT_SPLIT, n: int = DEFAULT_N, which: str = DEFAULT_WHICH,
                     seed: int = 0) -> PromptSet:
    """The digit world's evaluation captions (``diffunlearn.data.prompts.eval_sets``) as prompts.

    Named ``which`` (``forget``/``remain``); seeds and guidances are all ``None``.

    Raises:
        UserError: unknown concept, split or side, or a non-positive ``n``.
    """
    from ..data.prompts import eval_sets
    from ..worlds import digits

    what = f"world:{concept}:{split}:{which}:{n}"
    if concept not in digits.DIGITS and concept not in digits.COLOURS:
        raise UserError(f"{what}: unknown concept {concept!r}; choose a digit word (e.g. three) "
                        f"or a colour ({', '.join(digits.COLOURS)}).")
    _check_split_which_n(split, which, n, what)
    forget, remain = eval_sets(concept, n, split=split, seed=seed)
    prompts = [c.text for c in (forget if which == "forget" else remain)]
    return PromptSet(name=which, prompts=prompts, seeds=[None] * n,
                     guidances=[None] * n, source=what, sha256=_text_sha256(prompts))


def _parse_builtin(spec: str) -> PromptSet:
    """``KIND:CONCEPT[:SPLIT[:forget|remain[:N]]]`` -> a built-in set.

    Raises:
        UserError: too many parts, empty concept, non-integer N, or what the builders raise.
    """
    kind, *parts = spec.split(":")
    usage = f"{kind}:CONCEPT[:SPLIT[:forget|remain[:N]]]"
    if not 1 <= len(parts) <= 4 or not parts[0]:
        raise UserError(f"prompt set spec {spec!r} is malformed; write it as {usage}, e.g. {kind}:"
                        f"{'nudity' if kind == 'template' else 'three'}:test:forget:100.")
    concept = parts[0]
    split = parts[1] if len(parts) > 1 and parts[1] else DEFAULT_SPLIT
    which = parts[2] if len(parts) > 2 and parts[2] else DEFAULT_WHICH
    n = DEFAULT_N
    if len(parts) > 3 and parts[3]:
        try:
            n = int(parts[3])
        except ValueError:
            raise UserError(f"prompt set spec {spec!r}: the count {parts[3]!r} is not an integer; "
                            f"write it as {usage}.") from None
    builder = template_prompt_set if kind == "template" else world_prompt_set
    return builder(concept, split=split, n=n, which=which)


def class_prompt_set(spec: str) -> PromptSet:
    """``class:NAME[,NAME...][:N]`` -> ``N`` prompts (default 100) of each class name, class-major,
    for class-conditional models (whose "prompt" is a class name). Named ``forget`` for one class
    and ``remain`` for several, the names ``diffunlearn compare`` and the ``classifier`` metric use.

    Raises:
        UserError: no class name, or a count that is not a positive integer.
    """
    usage = "class:NAME[,NAME...][:N], e.g. class:airplane:100 or class:automobile,bird,cat:20"
    _, _, rest = spec.partition(":")
    names_part, _, count = rest.partition(":")
    names = [n.strip() for n in names_part.split(",") if n.strip()]
    if not names or ":" in count:
        raise UserError(f"prompt set spec {spec!r} is malformed; write it as {usage}.")
    try:
        n = int(count) if count else DEFAULT_N
    except ValueError:
        raise UserError(f"prompt set spec {spec!r}: the count {count!r} is not an integer; "
                        f"write it as {usage}.") from None
    if n < 1:
        raise UserError(f"prompt set spec {spec!r}: the count must be at least 1.")
    prompts = [name for name in names for _ in range(n)]
    return PromptSet(name="forget" if len(names) == 1 else "remain", prompts=prompts, seeds=[None] * len(prompts),
                     guidances=[None] * len(prompts), source=spec, sha256=_text_sha256(prompts))


_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _resolve_one(spec: str) -> PromptSet:
    """One spec without a ``NAME=`` prefix -> its prompt set."""
    # A built-in spec wins over a file only if no such file exists, so odd but real file names
    # (``template:x.txt`` on Linux) still load.
    if spec.split(":", 1)[0] in ("template", "world") and ":" in spec and not Path(spec).exists():
        return _parse_builtin(spec)
    if spec.startswith("class:") and not Path(spec).exists():
        return class_prompt_set(spec)
    return load_prompt_set(spec)


def resolve_prompt_sets(specs: list[str]) -> list[PromptSet]:
    """Turn specs (file paths, ``template:...``, ``world:...``, optionally ``NAME=SPEC``) into prompt
    sets, in order.

    Returns:
        One :class:`PromptSet` per spec (an empty list for no specs); the caller decides whether
        no sets is an error.

    Raises:
        UserError: a bad spec or file (see :func:`load_prompt_set`), or two sets with the same name.
    """
    sets: list[PromptSet] = []
    origin: dict[str, str] = {}
    for spec in specs:
        spec = str(spec)
        name, sep, rest = spec.partition("=")
        if sep and rest and _NAME_RE.fullmatch(name) and not Path(spec).exists():
            prompt_set = dataclasses.replace(_resolve_one(rest), name=name)
        else:
            prompt_set = _resolve_one(spec)
        if prompt_set.name in origin:
            raise UserError(f"prompt sets {origin[prompt_set.name]!r} and {spec!r} are both named "
                            f"{prompt_set.name!r}; name one of them with NAME=SPEC, e.g. "
                            f"{prompt_set.name}-2={spec}.")
        origin[prompt_set.name] = spec
        sets.append(prompt_set)
    return sets
