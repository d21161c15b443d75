"""Labelled image sets for the class-conditional track (PAPER.md, the CIFAR-10 experiment): forget one
class of a class-conditional diffusion model while keeping the others.

Two sources are read, both into a :class:`ClassDataset` of ``(N, C, H, W)`` float32 images in [-1, 1]:

* a folder in ImageFolder layout, one sub-folder per class (class names are the sub-folder names,
  sorted); the image files directly inside each are read with PIL, sorted by name;
* a ``.npz`` file with ``images``, ``labels`` and, optionally, ``classes`` (never unpickled).

The unlearning sets are index lists into the dataset. The forget set is every image of the target
class; the remain set is the paper's diverse D_r, ``per_class`` random images of every other class,
or, as the low-diversity control, the same number of images drawn from a few named classes only.
Every choice is seeded and recorded (:func:`selection_record`) so that a run can be reproduced.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclasses.dataclass
class ClassDataset:
    """Labelled images: ``images`` ``(N, C, H, W)`` float32 in [-1, 1], ``labels`` ``(N,)`` int64 in
    ``0..len(class_names)-1``, and ``source``, the folder or file they were read from."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def count(self, label: int) -> int:
        """How many images carry ``label``."""
        return int((self.labels == label).sum())


# ----------------------------------------------------------------------------------------------- loading

def _check_request(image_size: int | None, channels: int | None) -> None:
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size < 1):
        raise UserError(f"image size {image_size!r} is not a positive whole number of pixels; pass e.g. 32")
    if channels is not None and channels not in (1, 3):
        raise UserError(f"channels must be 1 (greyscale) or 3 (RGB), not {channels!r}")


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, antialiased resize of ``(N, C, H, W)`` [-1, 1] images to ``size`` x ``size``; the one
    resize used for both sources, so a folder and its npz export give the same tensors."""
    if images.shape[-2:] == (size, size):
        return images
    out = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.clamp_(-1, 1)


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _load_folder(folder: Path, image_size: int | None, channels: int | None) -> ClassDataset:
    class_dirs = sorted((p for p in folder.iterdir() if p.is_dir() and not _hidden(p)), key=lambda p: p.name)
    if not class_dirs:
        raise UserError(f"{folder} has no class sub-folders; put the images of each class in a sub-folder "
                        "named after the class (ImageFolder layout)")
    mode = "L" if channels == 1 else "RGB"
    images: list[torch.Tensor] = []
    labels: list[int] = []
    first: tuple[Path, tuple[int, int]] | None = None  # the first image read, for the size-mismatch message
    for label, class_dir in enumerate(class_dirs):
        files = sorted((p for p in class_dir.iterdir() if p.is_file() and not _hidden(p)
                        and p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name)
        if not files:
            raise UserError(f"class folder {class_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}); add "
                            "images to it or remove it")
        for file in files:
            try:
                with Image.open(file) as img:
                    array = np.asarray(img.convert(mode))
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise UserError(f"cannot read image {file} ({exc}); replace or delete that file") from None
            if array.ndim == 2:
                array = array[:, :, None]
            tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous().float() / 127.5 - 1
            if image_size is not None:
                tensor = _resize(tensor[None], image_size)[0]
            elif first is None:
                first = (file, tuple(tensor.shape[-2:]))
            elif tuple(tensor.shape[-2:]) != first[1]:
                raise UserError(f"images in {folder} differ in size ({first[0]} is {first[1][1]}x{first[1][0]}, "
                                f"{file} is {tensor.shape[-1]}x{tensor.shape[-2]}); pass an image size to resize "
                                "them all")
            images.append(tensor)
            labels.append(label)
    return ClassDataset(torch.stack(images).contiguous(), torch.tensor(labels, dtype=torch.long),
                        tuple(p.name for p in class_dirs), str(folder))


def _npz_array(data, path: Path, key: str) -> np.ndarray:
    try:
        return data[key]
    except ValueError:
        # numpy refuses object arrays when allow_pickle=False: they would run code from the file
        raise UserError(f"array '{key}' in {path} holds Python objects (pickled), which are not loaded for "
                        "safety; save it as a plain numeric or string array") from None
    except (OSError, EOFError, KeyError) as exc:
        raise UserError(f"cannot read array '{key}' from {path} ({exc}); write the file again") from None


def _npz_images(array: np.ndarray, path: Path) -> torch.Tensor:
    """``images`` from an npz as ``(N, C, H, W)`` float32 in [-1, 1]."""
    if array.ndim == 3:
        array = array[:, :, :, None]
    if array.ndim != 4:
        raise UserError(f"'images' in {path} has shape {array.shape}; save it as (N, H, W), (N, H, W, C) or "
                        "(N, C, H, W) with C = 1 or 3")
    # channels last is numpy's (and write_npz's) convention, so it wins when both readings fit (3x3 images)
    if array.shape[3] in (1, 3):
        array = array.transpose(0, 3, 1, 2)
    elif array.shape[1] not in (1, 3):
        raise UserError(f"'images' in {path} has shape {array.shape}, with no axis of 1 or 3 channels; save it "
                        "as (N, H, W, C) or (N, C, H, W) with C = 1 or 3")
    if array.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(array)).float() / 127.5 - 1
    if array.dtype.kind not in "iuf":
        raise UserError(f"'images' in {path} has type {array.dtype}; save it as uint8 (0..255) or float "
                        "([0, 1] or 0..255)")
    values = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))
    if values.numel() and not torch.isfinite(values).all():
        raise UserError(f"'images' in {path} holds NaN or infinite values; save finite pixel values")
    low = float(values.min()) if values.numel() else 0.0
    high = float(values.max()) if values.numel() else 0.0
    if low < 0 or high > 255:
        raise UserError(f"'images' in {path} range over [{low:g}, {high:g}]; save them in [0, 1] or 0..255")
    if array.dtype.kind == "f" and high <= 1:
        return (values * 2 - 1).float()
    return (values / 127.5 - 1).float()


def _load_npz(path: Path, image_size: int | None, channels: int | None) -> ClassDataset:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise UserError(f"cannot read {path} as an .npz archive ({exc}); write it with numpy.savez") from None
    if not hasattr(data, "files"):  # a plain .npy saved under an .npz name
        raise UserError(f"{path} is a single array, not an .npz archive; save it with numpy.savez(images=..., "
                        "labels=...)")
    with data:
        missing = [k for k in ("images", "labels") if k not in data.files]
        if missing:
            raise UserError(f"{path} lacks the array(s) {', '.join(missing)}; save it with "
                            "numpy.savez(path, images=..., labels=..., classes=...)")
        raw_images = _npz_array(data, path, "images")
        raw_labels = _npz_array(data, path, "labels")
        raw_classes = _npz_array(data, path, "classes") if "classes" in data.files else None
    if raw_labels.ndim != 1 or raw_labels.dtype.kind not in "iu":
        raise UserError(f"'labels' in {path} has shape {raw_labels.shape} and type {raw_labels.dtype}; save "
                        "them as one integer class index per image")
    n = raw_labels.shape[0]
    if raw_images.ndim < 1 or raw_images.shape[0] != n:
        count = raw_images.shape[0] if raw_images.ndim else 0
        raise UserError(f"{path} holds {count} images but {n} labels; save one label per image")
    if n == 0:
        raise UserError(f"{path} holds no images; save at least one labelled image")
    if raw_classes is not None:
        if raw_classes.ndim != 1 or raw_classes.dtype.kind != "U" or raw_classes.shape[0] == 0:
            raise UserError(f"'classes' in {path} has shape {raw_classes.shape} and type {raw_classes.dtype}; "
                            "save it as a 1-D array of class names (numpy.array([...], dtype=str))")
        names = tuple(str(c) for c in raw_classes)
        if len(set(names)) != len(names):
            raise UserError(f"'classes' in {path} repeats a class name; give each class a different name")
    else:
        names = tuple(str(i) for i in range(int(raw_labels.max()) + 1)) if raw_labels.min() >= 0 else ()
    low, high = int(raw_labels.min()), int(raw_labels.max())
    if low < 0 or high >= len(names):
        raise UserError(f"labels in {path} range over {low}..{high} but there are {len(names)} classes; labels "
                        f"must lie in 0..{len(names) - 1}")
    images = _npz_images(raw_images, path)
    if channels == 1 and images.shape[1] == 3:
        # PIL's "L" conversion (ITU-R 601-2 luma), on [0, 1] values
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        images = ((images + 1) / 2 * weights).sum(1, keepdim=True) * 2 - 1
    elif channels == 3 and images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if image_size is not None:
        images = _resize(images, image_size)
    return ClassDataset(images.contiguous(), torch.from_numpy(raw_labels.astype(np.int64)), names, str(path))


def load_class_images(source: str | os.PathLike, image_size: int | None = None,
                      channels: int | None = None) -> ClassDataset:
    """Read a labelled image set from an ImageFolder-layout folder or an ``.npz`` file.

    Args:
        image_size: resize every image (bilinear, antialiased) to this square side; None keeps the
            source's size, which must then be the same for every image.
        channels: 1 (greyscale) or 3 (RGB); None keeps the source's (folder images are read as RGB).

    Raises:
        UserError: a missing or unreadable source, an empty class folder, an unreadable image, images
            and labels that disagree, labels out of range, images of different sizes without
            ``image_size``, or pickled (object) arrays.
    """
    _check_request(image_size, channels)
    path = Path(source)
    if not path.exists():
        raise UserError(f"{path} does not exist; give an ImageFolder-layout folder or an .npz file")
    if path.is_dir():
        return _load_folder(path, image_size, channels)
    if path.suffix.lower() == ".npz":
        return _load_npz(path, image_size, channels)
    raise UserError(f"{path} is neither a folder nor an .npz file; give an ImageFolder-layout folder (one "
                    "sub-folder per class) or an .npz file with 'images' and 'labels'")


def write_npz(path: str | os.PathLike, dataset: ClassDataset) -> None:
    """Save ``dataset`` as an ``.npz`` that :func:`load_class_images` reads back exactly: ``images``
    uint8 ``(N, H, W, C)``, ``labels`` int64 ``(N,)``, ``classes`` a unicode array. Written atomically."""
    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise UserError(f"{path} does not end in .npz; name the file e.g. {path.name}.npz")
    images = ((dataset.images.detach().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arrays = {"images": images.permute(0, 2, 3, 1).contiguous().numpy(),
              "labels": dataset.labels.detach().cpu().to(torch.int64).numpy(),
              "classes": np.array(list(dataset.class_names), dtype=str)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:  # a file handle, so numpy does not append another ".npz"
            np.savez_compressed(handle, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------- selection

def _normalise(name: str) -> str:
    return "".join(name.split()).casefold()


def resolve_class(name: str, class_names: Sequence[str]) -> int:
    """The index of the class called ``name`` (case and spaces ignored) or, failing a name match, the
    class whose index ``name`` spells in decimal ("3").

    Raises:
        UserError: no such class; the message lists the classes.
    """
    wanted = _normalise(str(name))
    for i, candidate in enumerate(class_names):
        if _normalise(candidate) == wanted:
            return i
    text = str(name).strip()
    if text.isdecimal() and text.isascii() and int(text) < len(class_names):
        return int(text)
    listing = ", ".join(f"{i}={c}" for i, c in enumerate(class_names))
    raise UserError(f"there is no class {name!r}; choose one of {listing} (by name or index)")


def _label(c: int, class_names: Sequence[str] | None) -> str:
    return f"class {c} ({class_names[c]})" if class_names is not None and 0 <= c < len(class_names) else f"class {c}"


def select_sets(labels: torch.Tensor, target: int, per_class: int = 50, control: Sequence[int] | None = None,
                seed: int = 0, class_names: Sequence[str] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the forget and remain sets, as sorted index tensors into the dataset.

    The forget set is every image of ``target``. The remain set is, by default, the paper's diverse
    D_r: ``per_class`` images drawn without replacement from each other class. With ``control`` (class
    indices, none the target) it is the low-diversity control: the same total, ``per_class x (K - 1)``,
    drawn from the named classes only, split as evenly as possible (the remainder to the first named).
    The number of classes K is ``len(class_names)`` if given, else the largest label + 1.

    Args:
        class_names: only for the error messages, and for K.

    Raises:
        UserError: bad target or control classes, ``per_class`` < 1, or a class with too few images.
    """
    labels = torch.as_tensor(labels).reshape(-1).long()
    if labels.numel() == 0:
        raise UserError("the dataset holds no images; give a labelled image set")
    k = len(class_names) if class_names is not None else int(labels.max()) + 1
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise UserError(f"per_class must be a positive whole number, not {per_class!r}")
    if k < 2:
        raise UserError("the dataset has a single class, so there is nothing to remain; give images of at least "
                        "two classes")
    target = int(target)
    if not 0 <= target < k:
        raise UserError(f"target class {target} is out of range; choose a class index in 0..{k - 1}")
    members = [torch.nonzero(labels == c).flatten() for c in range(k)]  # ascending dataset indices
    forget = members[target]
    if forget.numel() == 0:
        raise UserError(f"{_label(target, class_names)} has no images, so there is nothing to forget; choose "
                        "another target")
    generator = torch.Generator().manual_seed(int(seed))
    if control is None:
        quota = {c: per_class for c in range(k) if c != target}
        smallest = min((members[c].numel() for c in quota), default=0)
        advice = f"pass a per_class of at most {smallest}" if smallest else "give images of every class"
    else:
        control = [int(c) for c in control]
        if len(control) < 1:
            raise UserError("the control set names no class; name at least one class other than the target")
        if len(set(control)) != len(control):
            raise UserError(f"the control classes {control} repeat a class; name each class once")
        for c in control:
            if not 0 <= c < k:
                raise UserError(f"control class {c} is out of range; choose class indices in 0..{k - 1}")
            if c == target:
                raise UserError(f"control {_label(c, class_names)} is the target; the control remain set "
                                "must come from other classes")
        total = per_class * (k - 1)
        base, extra = divmod(total, len(control))
        quota = {c: base + (1 if i < extra else 0) for i, c in enumerate(control)}
        advice = "pass a smaller per_class or name more control classes"
    chosen = []
    # classes in ascending index order, each drawing from the one generator, so a seed fixes everything
    for c in sorted(quota):
        have, want = members[c].numel(), quota[c]
        if have < want:
            raise UserError(f"{_label(c, class_names)} has only {have} images but the remain set needs {want} "
                            f"of it; {advice}")
        order = torch.randperm(have, generator=generator)[:want]
        chosen.append(members[c][order])
    remain = torch.sort(torch.cat(chosen)).values if chosen else torch.empty(0, dtype=torch.long)
    return forget.clone(), remain


def pair_indices(forget_idx: torch.Tensor, remain_idx: torch.Tensor, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Make the forget and remain index lists equally long, for the training loop that pairs them row
    by row: the longer is returned unchanged, the shorter is extended to the same length by running
    through successive seeded random permutations of itself (each element is used once before any is
    used again).

    Raises:
        UserError: one list is empty and the other is not (nothing to pair with).
    """
    forget_idx = torch.as_tensor(forget_idx).reshape(-1).long()
    remain_idx = torch.as_tensor(remain_idx).reshape(-1).long()
    n_f, n_r = forget_idx.numel(), remain_idx.numel()
    if n_f == n_r:
        return forget_idx.clone(), remain_idx.clone()
    if min(n_f, n_r) == 0:
        raise UserError(f"cannot pair {n_f} forget images with {n_r} remain images; both sets need images")
    generator = torch.Generator().manual_seed(int(seed))
    short = forget_idx if n_f < n_r else remain_idx
    length = max(n_f, n_r)
    rounds = -(-length // short.numel())  # ceil
    cycled = torch.cat([short[torch.randperm(short.numel(), generator=generator)] for _ in range(rounds)])[:length]
    return (cycled, remain_idx.clone()) if n_f < n_r else (forget_idx.clone(), cycled)


def selection_record(dataset: ClassDataset, target: int, forget_idx: torch.Tensor, remain_idx: torch.Tensor,
                     per_class: int, control: Sequence[int] | None, seed: int) -> dict:
    """A JSON-serialisable account of the chosen sets (before :func:`pair_indices`), for the run folder."""
    remain_idx = torch.as_tensor(remain_idx).reshape(-1).long()
    remain_labels = dataset.labels[remain_idx]
    counts = {name: int((remain_labels == i).sum()) for i, name in enumerate(dataset.class_names)
              if i != int(target)}
    return {
        "source": dataset.source,
        "mode": "balanced" if control is None else "control",
        "target": {"index": int(target), "name": dataset.class_names[int(target)]},
        "control": None if control is None else [{"index": int(c), "name": dataset.class_names[int(c)]}
                                                 for c in control],
        "per_class": int(per_class),
        "seed": int(seed),
        "dataset_size": len(dataset),
        "forget_count": int(torch.as_tensor(forget_idx).numel()),
        "remain_count": int(remain_idx.numel()),
        "remain_per_class": counts,
        "remain_indices": [int(i) for i in remain_idx.tolist()],
    }
