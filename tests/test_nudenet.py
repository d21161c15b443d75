"""NudeNet metric: counting arithmetic on injected detections, and the real bundled detector offline."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from diffunlearn.errors import UserError
from diffunlearn.evaluate.base import MetricResult
from diffunlearn.evaluate.nudenet import EXPOSED_CLASSES, NudeNetMetric, count_detections


def det(label: str, score: float) -> dict:
    return {"class": label, "score": score, "box": [0, 0, 1, 1]}


def test_exposed_classes_are_real_nudenet_labels():
    import nudenet.nudenet as impl

    labels = getattr(impl, "__labels")  # module-level list in nudenet 3.4.x (no name mangling at module scope)
    assert set(EXPOSED_CLASSES) <= set(labels)
    assert set(EXPOSED_CLASSES) == {label for label in labels if label.endswith("_EXPOSED")}


def test_threshold_boundary_is_inclusive():
    aggregate, per_sample = count_detections(
        [[det("FEMALE_BREAST_EXPOSED", 0.6)], [det("FEMALE_BREAST_EXPOSED", 0.59)]], threshold=0.6)
    assert aggregate["FEMALE_BREAST_EXPOSED"] == 1
    assert per_sample[0]["exposed"]["FEMALE_BREAST_EXPOSED"] == 1
    assert per_sample[1]["exposed"]["FEMALE_BREAST_EXPOSED"] == 0
    # max_score ignores the threshold, so a later threshold sweep needs no rerun.
    assert per_sample[1]["max_score"] == pytest.approx(0.59)
    assert aggregate["nude_fraction"] == 0.5


def test_covered_classes_and_faces_are_ignored():
    aggregate, per_sample = count_detections(
        [[det("FEMALE_BREAST_COVERED", 0.99), det("FACE_FEMALE", 0.9), det("BUTTOCKS_COVERED", 0.8)]], 0.6)
    assert aggregate["detections_total"] == 0
    assert aggregate["nude_fraction"] == 0.0
    assert per_sample[0]["max_score"] == 0.0
    assert set(per_sample[0]["exposed"]) == set(EXPOSED_CLASSES)


def test_fraction_and_totals_arithmetic():
    detections = [
        [det("BELLY_EXPOSED", 0.7), det("BELLY_EXPOSED", 0.8), det("FEET_EXPOSED", 0.65)],  # 3 counted
        [],
        [det("ARMPITS_EXPOSED", 0.3), det("FACE_MALE", 0.95)],                                 # none counted
        [det("MALE_GENITALIA_EXPOSED", 0.91)],                                                 # 1 counted
    ]
    aggregate, per_sample = count_detections(detections, 0.6)
    assert aggregate["BELLY_EXPOSED"] == 2
    assert aggregate["FEET_EXPOSED"] == 1
    assert aggregate["MALE_GENITALIA_EXPOSED"] == 1
    assert aggregate["ARMPITS_EXPOSED"] == 0
    assert aggregate["detections_total"] == 4
    assert aggregate["images"] == 4
    assert aggregate["nude_fraction"] == 0.5
    assert [s["max_score"] for s in per_sample] == pytest.approx([0.8, 0.0, 0.3, 0.91])
    assert all(isinstance(v, int) for s in per_sample for v in s["exposed"].values())
    assert count_detections([], 0.6)[0]["nude_fraction"] == 0.0


def test_malformed_detection_is_a_bug():
    with pytest.raises(ValueError, match="lacks"):
        count_detections([[{"class": "BELLY_EXPOSED"}]], 0.6)


@pytest.mark.parametrize("threshold", [0.1, 1.5, float("nan"), "high"])
def test_bad_threshold_is_a_user_error(threshold):
    with pytest.raises(UserError, match="nudenet_threshold"):
        NudeNetMetric(SimpleNamespace(nudenet_threshold=threshold))


def test_options_default_from_any_object():
    metric = NudeNetMetric(object())
    assert metric.threshold == 0.6 and metric.batch_size >= 1
    assert NudeNetMetric(None).threshold == 0.6
    with pytest.raises(UserError, match="batch_size"):
        NudeNetMetric(SimpleNamespace(batch_size=0))


def test_settings_record_detector_hash_and_threshold():
    settings = NudeNetMetric(SimpleNamespace(nudenet_threshold=0.7, batch_size=4)).settings()
    assert settings["threshold"] == 0.7
    assert settings["detector"] == "320n.onnx"
    assert re.fullmatch(r"[0-9a-f]{64}", settings["detector_sha256"])
    assert settings["nudenet_version"].startswith("3.4")
    assert settings["exposed_classes"] == list(EXPOSED_CLASSES)


def synthetic_images() -> torch.Tensor:
    """Solid colours plus a skin-toned blob on a dark background, (N,3,H,W) in [-1,1]."""
    h = w = 96
    solids = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0], [0.8, -0.6, -0.6]]).view(3, 3, 1, 1).expand(3, 3, h, w)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    blob = ((xx / 0.5) ** 2 + (yy / 0.8) ** 2 <= 1).float()
    skin = torch.tensor([0.88, 0.45, 0.25]).view(3, 1, 1)  # ~ RGB(240, 185, 160)
    blob_image = (skin * blob + -0.8 * (1 - blob)).unsqueeze(0)
    return torch.cat([solids, blob_image]).contiguous()


def test_real_detector_offline_and_built_once(monkeypatch):
    import nudenet

    constructed = []
    original = nudenet.NudeDetector

    class CountingDetector(original):
        def __init__(self, *args, **kwargs):
            constructed.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(nudenet, "NudeDetector", CountingDetector)
    metric = NudeNetMetric(SimpleNamespace(nudenet_threshold=0.6, batch_size=3))
    images = synthetic_images()
    prompts = [f"p{i}" for i in range(len(images))]
    first = metric.score(images, prompts, "forget")
    second = metric.score(images[:2], prompts[:2], "remain")
    assert len(constructed) == 1

    assert isinstance(first, MetricResult) and first.name == "nudenet"
    assert len(first.per_sample) == 4 and len(second.per_sample) == 2
    for label in EXPOSED_CLASSES:
        assert isinstance(first.aggregate[label], int) and first.aggregate[label] >= 0
    assert 0.0 <= first.aggregate["nude_fraction"] <= 1.0
    assert first.aggregate["images"] == 4
    for sample, prompt in zip(first.per_sample, prompts):
        assert sample["prompt"] == prompt
        assert set(sample["exposed"]) == set(EXPOSED_CLASSES)
        assert 0.0 <= sample["max_score"] <= 1.0
    assert first.settings["threshold"] == 0.6
    # The same images give the same detections however they are batched.
    assert second.per_sample[:2] == [{**s, "prompt": p} for s, p in zip(first.per_sample[:2], prompts[:2])]


def test_score_rejects_mismatched_inputs():
    metric = NudeNetMetric(None)
    with pytest.raises(ValueError, match="prompts"):
        metric.score(torch.zeros(2, 3, 8, 8), ["only one"], "forget")
    with pytest.raises(ValueError):
        metric.score(torch.zeros(2, 8, 8), ["a", "b"], "forget")


def test_arrays_reach_the_detector_exactly_as_png_files_would(tmp_path):
    """The paper's evaluation reads saved PNGs with cv2.imread (BGR); our arrays must give the same blob."""
    from nudenet.nudenet import _read_image
    from PIL import Image

    from diffunlearn.evaluate.nudenet import _to_bgr_uint8

    torch.manual_seed(0)
    images = torch.rand(2, 3, 40, 56) * 2 - 1
    rgb = ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for array, pixels in zip(_to_bgr_uint8(images), rgb):
        path = tmp_path / "image.png"
        Image.fromarray(pixels).save(path)
        from_file, from_array = _read_image(str(path)), _read_image(array)
        assert (from_file[0] == from_array[0]).all()
        assert from_file[1:] == from_array[1:]
