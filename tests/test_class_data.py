"""Labelled image sets for the class-conditional track: loading (ImageFolder, npz), the forget/remain
selection (balanced D_r and the low-diversity control), pairing, and the record a run writes."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402
from collections import Counter  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from diffunlearn.data.classes import (  # noqa: E402
    ClassDataset,
    load_class_images,
    pair_indices,
    resolve_class,
    select_sets,
    selection_record,
    write_npz,
)
from diffunlearn.errors import UserError  # noqa: E402

# class -> colours of its two images; written in an unsorted order to check that class order is by name
COLOURS = {"dog": [(0, 0, 255), (255, 255, 255)], "bird": [(10, 20, 30), (51, 102, 153)],
           "cat": [(1, 2, 3), (200, 100, 0)]}


def _solid(path, colour, size=(4, 4)):
    Image.new("RGB", size, colour).save(path)


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "set"
    for name, colours in COLOURS.items():
        (root / name).mkdir(parents=True)
        for j, colour in enumerate(colours):
            _solid(root / name / f"img{j}.png", colour)
        (root / name / "notes.txt").write_text("not an image")
        (root / name / ".hidden.png").write_bytes(b"not read")
    (root / ".cache").mkdir()  # a hidden folder is not a class
    (root / "README.md").write_text("top-level files are ignored")
    return root


def _expected(colour):
    return torch.tensor(colour, dtype=torch.uint8).float().div(127.5).sub(1).view(3, 1, 1).expand(3, 4, 4)


def test_image_folder_gives_sorted_classes_and_exact_values(folder):
    data = load_class_images(folder)
    assert data.class_names == ("bird", "cat", "dog")
    assert data.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert data.images.shape == (6, 3, 4, 4) and data.images.dtype == torch.float32
    assert data.source == str(folder)
    assert len(data) == 6 and data.num_classes == 3 and data.count(1) == 2 and data.count(5) == 0
    order = [c for name in ("bird", "cat", "dog") for c in COLOURS[name]]
    for i, colour in enumerate(order):
        assert torch.equal(data.images[i], _expected(colour))
    assert data.images[4, 2, 0, 0].item() == 1.0 and data.images[4, 0, 0, 0].item() == -1.0  # (0, 0, 255)
    assert data.images[5].eq(1.0).all()  # white
    assert data.images[1, 0, 0, 0].item() == pytest.approx(51 / 127.5 - 1) == pytest.approx(-0.6)


def test_image_folder_resize_and_greyscale(folder):
    small = load_class_images(folder, image_size=2)
    assert small.images.shape == (6, 3, 2, 2)
    # a solid colour stays the same colour under an antialiased bilinear resize
    assert torch.allclose(small.images[2], _expected((1, 2, 3))[:, :2, :2], atol=1e-6)
    grey = load_class_images(folder, channels=1)
    assert grey.images.shape == (6, 1, 4, 4)
    # PIL's "L" conversion: (0, 0, 255) -> round(255 * 0.114) = 29
    assert grey.images[4, 0, 0, 0].item() == pytest.approx(29 / 127.5 - 1)
    big = load_class_images(folder, image_size=8, channels=3)
    assert big.images.shape == (6, 3, 8, 8)


def test_image_folder_sizes_must_agree_unless_resized(folder):
    _solid(folder / "cat" / "wide.png", (9, 9, 9), size=(6, 4))
    with pytest.raises(UserError, match="wide.png is 6x4.*image size"):
        load_class_images(folder)
    data = load_class_images(folder, image_size=5)
    assert data.images.shape == (7, 3, 5, 5)
    assert data.labels.tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert torch.allclose(data.images[4], torch.full((3, 5, 5), 9 / 127.5 - 1), atol=1e-6)


def test_image_folder_errors(folder, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_class_images(tmp_path / "nowhere")
    with pytest.raises(UserError, match="neither a folder nor an .npz"):
        load_class_images(folder / "README.md")
    (folder / "empty").mkdir()
    with pytest.raises(UserError, match=r"class folder .*empty holds no images"):
        load_class_images(folder)
    (folder / "empty").rmdir()
    (folder / "cat" / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(UserError, match=r"cannot read image .*broken\.png"):
        load_class_images(folder)
    flat = tmp_path / "flat"
    flat.mkdir()
    _solid(flat / "a.png", (0, 0, 0))
    with pytest.raises(UserError, match="no class sub-folders"):
        load_class_images(flat)
    with pytest.raises(UserError, match="channels must be 1"):
        load_class_images(folder, channels=4)


def test_npz_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(5, 3, 3, 3), dtype=np.uint8)  # 3x3: channels-last must win
    original = ClassDataset(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1,
                            torch.tensor([2, 0, 1, 2, 2]), ("plane", "car", "bird"), "memory")
    write_npz(tmp_path / "set.npz", original)
    with np.load(tmp_path / "set.npz", allow_pickle=False) as raw:
        assert raw["images"].dtype == np.uint8 and raw["images"].shape == (5, 3, 3, 3)
        assert np.array_equal(raw["images"], pixels)
        assert raw["classes"].tolist() == ["plane", "car", "bird"]
    back = load_class_images(tmp_path / "set.npz")
    assert torch.equal(back.images, original.images)
    assert back.labels.tolist() == [2, 0, 1, 2, 2] and back.labels.dtype == torch.long
    assert back.class_names == ("plane", "car", "bird")
    assert back.source == str(tmp_path / "set.npz")
    write_npz(tmp_path / "again.npz", back)
    assert torch.equal(load_class_images(tmp_path / "again.npz").images, original.images)
    with pytest.raises(UserError, match="does not end in .npz"):
        write_npz(tmp_path / "set.bin", original)


def test_folder_to_npz_gives_the_same_tensors(folder, tmp_path):
    data = load_class_images(folder, image_size=3)
    write_npz(tmp_path / "f.npz", data)
    back = load_class_images(tmp_path / "f.npz")
    assert torch.allclose(back.images, data.images, atol=1 / 255)  # uint8 quantisation only
    assert back.class_names == ("bird", "cat", "dog") and back.labels.tolist() == [0, 0, 1, 1, 2, 2]
    exact = load_class_images(folder)
    write_npz(tmp_path / "e.npz", exact)
    assert torch.equal(load_class_images(tmp_path / "e.npz", image_size=2).images,
                       load_class_images(folder, image_size=2).images)


def test_npz_layouts_and_float_pixels(tmp_path):
    labels = np.array([0, 1, 1, 3])
    chw = np.arange(4 * 3 * 5 * 5, dtype=np.float32).reshape(4, 3, 5, 5) % 256 / 255  # floats in [0, 1]
    np.savez(tmp_path / "chw.npz", images=chw, labels=labels)
    data = load_class_images(tmp_path / "chw.npz")
    assert data.images.shape == (4, 3, 5, 5)
    assert data.class_names == ("0", "1", "2", "3")  # K = max label + 1
    assert data.images[0, 0, 0, 1].item() == pytest.approx(2 / 255 - 1)
    assert data.images[3, 2, 4, 4].item() == pytest.approx(2 * ((299 % 256) / 255) - 1)
    grey = np.full((4, 6, 6), 255.0)  # floats above 1 are read as 0..255
    grey[0, 0, 0] = 0
    np.savez(tmp_path / "grey.npz", images=grey, labels=labels)
    data = load_class_images(tmp_path / "grey.npz")
    assert data.images.shape == (4, 1, 6, 6)
    assert data.images[0, 0, 0, 0].item() == -1.0 and data.images[0, 0, 0, 1].item() == 1.0
    rgb = load_class_images(tmp_path / "grey.npz", image_size=3, channels=3)
    assert rgb.images.shape == (4, 3, 3, 3) and rgb.images[1].eq(1.0).all()
    pixels = np.zeros((4, 2, 2, 3), np.uint8)
    pixels[..., 2] = 255
    np.savez(tmp_path / "blue.npz", images=pixels, labels=labels)
    assert load_class_images(tmp_path / "blue.npz", channels=1).images[0, 0, 0, 0].item() == pytest.approx(
        2 * 0.114 - 1)


class _Evil:
    """Unpickling this would create ``marker``: proof that the loader never unpickles."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_npz_object_arrays_are_refused_not_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    evil = np.empty(2, dtype=object)
    evil[0], evil[1] = _Evil(marker), _Evil(marker)
    np.savez(tmp_path / "evil.npz", images=evil, labels=np.array([0, 1]))  # savez pickles object arrays
    with pytest.raises(UserError, match=r"'images' in .*evil\.npz holds Python objects"):
        load_class_images(tmp_path / "evil.npz")
    names = np.array(["a", "b"], dtype=object)
    np.savez(tmp_path / "names.npz", images=np.zeros((2, 4, 4), np.uint8), labels=np.array([0, 1]), classes=names)
    with pytest.raises(UserError, match="'classes' in .*holds Python objects"):
        load_class_images(tmp_path / "names.npz")
    assert not marker.exists()


def test_npz_errors(tmp_path):
    images = np.zeros((3, 4, 4, 3), np.uint8)
    np.savez(tmp_path / "range.npz", images=images, labels=np.array([0, 1, 3]), classes=np.array(["a", "b", "c"]))
    with pytest.raises(UserError, match=r"range over 0\.\.3 but there are 3 classes"):
        load_class_images(tmp_path / "range.npz")
    np.savez(tmp_path / "negative.npz", images=images, labels=np.array([0, -1, 1]))
    with pytest.raises(UserError, match="labels in .*negative.npz range over -1..1"):
        load_class_images(tmp_path / "negative.npz")
    np.savez(tmp_path / "short.npz", images=images, labels=np.array([0, 1]))
    with pytest.raises(UserError, match=r"short\.npz holds 3 images but 2 labels"):
        load_class_images(tmp_path / "short.npz")
    np.savez(tmp_path / "nolabels.npz", images=images)
    with pytest.raises(UserError, match="lacks the array"):
        load_class_images(tmp_path / "nolabels.npz")
    np.savez(tmp_path / "shape.npz", images=np.zeros((3, 4, 4, 5), np.uint8), labels=np.array([0, 1, 2]))
    with pytest.raises(UserError, match="no axis of 1 or 3 channels"):
        load_class_images(tmp_path / "shape.npz")
    np.savez(tmp_path / "signed.npz", images=np.full((3, 4, 4), -2.0), labels=np.array([0, 1, 2]))
    with pytest.raises(UserError, match=r"range over \[-2, -2\]"):
        load_class_images(tmp_path / "signed.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(UserError, match="cannot read .*junk.npz"):
        load_class_images(tmp_path / "junk.npz")


# 10 classes, class c has 20 + c images, in a fixed shuffled order
LABELS = torch.tensor([c for c in range(10) for _ in range(20 + c)])[torch.randperm(245,
                                                                                     generator=torch.Generator().manual_seed(1))]


def test_balanced_selection():
    forget, remain = select_sets(LABELS, target=3, per_class=5, seed=0)
    assert forget.tolist() == torch.nonzero(LABELS == 3).flatten().tolist()
    assert forget.numel() == 23 and forget.tolist() == sorted(forget.tolist())
    assert remain.numel() == 45 and remain.tolist() == sorted(remain.tolist())
    assert len(set(remain.tolist())) == 45
    counts = Counter(LABELS[remain].tolist())
    assert counts == {c: 5 for c in range(10) if c != 3}
    again = select_sets(LABELS, target=3, per_class=5, seed=0)
    assert torch.equal(again[0], forget) and torch.equal(again[1], remain)
    other = select_sets(LABELS, target=3, per_class=5, seed=1)[1]
    assert not torch.equal(other, remain)
    assert Counter(LABELS[other].tolist()) == counts
    everything = select_sets(LABELS, target=0, per_class=21)[1]  # classes 1..9 have 21..29 images
    assert everything.numel() == 9 * 21


def test_control_selection():
    forget, remain = select_sets(LABELS, target=3, per_class=5, control=[5, 7], seed=0)
    assert forget.numel() == 23
    assert remain.numel() == 45 and len(set(remain.tolist())) == 45 and remain.tolist() == sorted(remain.tolist())
    assert Counter(LABELS[remain].tolist()) == {5: 23, 7: 22}
    swapped = select_sets(LABELS, target=3, per_class=5, control=[7, 5], seed=0)[1]
    assert Counter(LABELS[swapped].tolist()) == {7: 23, 5: 22}  # the remainder goes to the first named
    three = select_sets(LABELS, target=3, per_class=2, control=[0, 5, 9])[1]
    assert Counter(LABELS[three].tolist()) == {0: 6, 5: 6, 9: 6}
    assert not torch.equal(select_sets(LABELS, 3, 5, [5, 7], seed=1)[1], remain)
    assert torch.equal(select_sets(LABELS, 3, 5, [5, 7], seed=0)[1], remain)


def test_selection_errors():
    with pytest.raises(UserError, match="class 0 has only 20 images .* needs 21 .* at most 20"):
        select_sets(LABELS, target=5, per_class=21)
    with pytest.raises(UserError, match=r"class 1 \(one\) has only 21 images .* needs 23 .* at most 21"):
        select_sets(LABELS, target=0, per_class=23, class_names=["zero", "one"] + ["x"] * 8)
    with pytest.raises(UserError, match="control class 3 is the target"):
        select_sets(LABELS, target=3, per_class=5, control=[1, 3])
    with pytest.raises(UserError, match="class 0 has only 20 images but the remain set needs 45"):
        select_sets(LABELS, target=3, per_class=5, control=[0])
    with pytest.raises(UserError, match="names no class"):
        select_sets(LABELS, target=3, per_class=5, control=[])
    with pytest.raises(UserError, match="out of range"):
        select_sets(LABELS, target=10, per_class=5)
    with pytest.raises(UserError, match="control class 12 is out of range"):
        select_sets(LABELS, target=3, control=[1, 12])
    with pytest.raises(UserError, match="per_class must be a positive"):
        select_sets(LABELS, target=3, per_class=0)


def test_pair_indices_cycles_the_shorter_set():
    forget = torch.tensor([3, 8, 11, 20, 21, 40, 41])
    remain = torch.arange(100, 145)
    f, r = pair_indices(forget, remain, seed=0)
    assert f.numel() == r.numel() == 45
    assert torch.equal(r, remain)
    for start in range(0, 42, 7):  # each run of 7 is a permutation: all used once before any repeats
        assert sorted(f[start:start + 7].tolist()) == forget.tolist()
    assert len(set(f[42:].tolist())) == 3 and set(f[42:].tolist()) <= set(forget.tolist())
    assert Counter(f.tolist()).most_common()[-1][1] == 6 and Counter(f.tolist()).most_common(1)[0][1] == 7
    assert torch.equal(pair_indices(forget, remain, seed=0)[0], f)
    assert not torch.equal(pair_indices(forget, remain, seed=1)[0], f)
    r2, f2 = pair_indices(remain, forget, seed=0)  # either side may be the shorter
    assert torch.equal(r2, remain) and f2.numel() == 45
    same = pair_indices(forget, forget + 1)
    assert torch.equal(same[0], forget) and torch.equal(same[1], forget + 1)
    with pytest.raises(UserError, match="cannot pair 0 forget images with 45"):
        pair_indices(torch.tensor([], dtype=torch.long), remain)


def test_resolve_class():
    names = ("airplane", "Sports Car", "dog")
    assert resolve_class("sports car", names) == 1
    assert resolve_class("SportsCar", names) == 1
    assert resolve_class("  DOG ", names) == 2
    assert resolve_class("0", names) == 0
    assert resolve_class("2", names) == 2
    assert resolve_class("1", ("5", "1")) == 1  # a name match wins over an index
    with pytest.raises(UserError, match="no class 'cat'; choose one of 0=airplane, 1=Sports Car, 2=dog"):
        resolve_class("cat", names)
    with pytest.raises(UserError, match="no class '3'"):
        resolve_class("3", names)


def test_selection_record_is_json():
    images = torch.zeros(245, 1, 2, 2)
    names = tuple(f"c{i}" for i in range(10))
    data = ClassDataset(images, LABELS, names, "cifar.npz")
    forget, remain = select_sets(data.labels, 3, per_class=5, control=[5, 7], seed=4, class_names=names)
    record = json.loads(json.dumps(selection_record(data, 3, forget, remain, 5, [5, 7], 4)))
    assert record["mode"] == "control" and record["source"] == "cifar.npz" and record["seed"] == 4
    assert record["target"] == {"index": 3, "name": "c3"}
    assert record["control"] == [{"index": 5, "name": "c5"}, {"index": 7, "name": "c7"}]
    assert record["forget_count"] == 23 and record["remain_count"] == 45 and record["dataset_size"] == 245
    assert record["remain_per_class"]["c5"] == 23 and record["remain_per_class"]["c7"] == 22
    assert record["remain_per_class"]["c0"] == 0 and "c3" not in record["remain_per_class"]
    assert record["remain_indices"] == remain.tolist()
    forget, remain = select_sets(data.labels, 3, per_class=5, seed=4)
    balanced = selection_record(data, 3, forget, remain, 5, None, 4)
    assert balanced["mode"] == "balanced" and balanced["control"] is None
    assert set(balanced["remain_per_class"].values()) == {5} and len(balanced["remain_per_class"]) == 9
