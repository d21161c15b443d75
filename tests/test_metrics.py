"""The evaluation metric layer: registry, CLIP alignment, zero-shot/user classifier, FID/KID, oracle metric.

Everything runs offline: a tiny random-weight CLIP built with ``build_tiny_clip``, the committed
digit-world oracle, and reference images rendered into a temporary folder.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffunlearn.errors import UserError
from diffunlearn.evaluate import fid as fid_module
from diffunlearn.evaluate.base import FACTORIES, MetricOptions, MetricResult, build_metric
from diffunlearn.evaluate.classifier import (
    NOISE_CLASS,
    ClassifierMetric,
    class_in_prompt,
    remaining_accuracy,
    unlearning_accuracy,
)
from diffunlearn.evaluate.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, build_tiny_clip, load_clip
from diffunlearn.evaluate.oracle_metric import OracleMetric, parse_caption
from diffunlearn.worlds import digits as world

PROMPTS = ["a red three on a black background", "a digit", "number seven, gray backdrop", "a photo of a cat."]
# Measured with build_tiny_clip(seed=0) on torch 2.13 / transformers 5.24 (random weights: only a regression pin).
PINNED_ALIGNMENT = 0.017699019983410835


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    return str(build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), seed=0))


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _write_pngs(images: torch.Tensor, folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(world.to_uint8(images)):
        Image.fromarray(array).save(folder / f"{i:04d}.png")


def _renders(n: int, seed: int, digit: int | None = None) -> torch.Tensor:
    none = [None] * n
    images, _ = world.render([digit] * n, none, none, torch.Generator().manual_seed(seed), split="test")
    return images


# ---------------------------------------------------------------------------------------------------------------------
# Registry


def test_unknown_metric_name_lists_the_names():
    with pytest.raises(UserError, match="unknown metric 'clipscore'") as err:
        build_metric("clipscore", MetricOptions())
    for name in ("alignment", "fid", "kid", "classifier", "oracle", "nudenet"):
        assert name in str(err.value)
    assert set(FACTORIES) == {"alignment", "fid", "kid", "classifier", "oracle", "nudenet"}


def test_nudenet_factory_without_its_module(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "diffunlearn.evaluate.nudenet", None)  # as if evaluate/nudenet.py were absent
    with pytest.raises(UserError, match="nudenet metric is not part"):
        build_metric("nudenet", MetricOptions())


# ---------------------------------------------------------------------------------------------------------------------
# CLIP and alignment


def test_clip_embeddings_are_unit_norm_and_preprocess_resizes(tiny_clip):
    clip = load_clip(tiny_clip)
    model, tokenizer, preprocess = clip  # unpacks as the documented 3-tuple
    img = clip.image_embeddings(_images(3, size=40))
    txt = clip.text_embeddings(PROMPTS)
    assert img.shape == (3, 32) and txt.shape == (4, 32) and img.dtype == txt.dtype == torch.float32
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(4))
    # Identical inputs give identical unit vectors, whose cosine is 1.
    again = clip.text_embeddings(PROMPTS[:1])
    assert float((again[0] * txt[0]).sum()) == pytest.approx(1.0, abs=1e-6)
    # Shortest side to 32, centre crop 32x32; a constant image stays constant, normalised with CLIP's mean/std.
    grey = torch.full((2, 3, 48, 80), 0.2)
    pixels = preprocess(grey)
    assert pixels.shape == (2, 3, 32, 32)
    expected = (torch.full((3,), 0.6) - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    torch.testing.assert_close(pixels[0, :, 5, 7], expected)


def test_alignment_matches_hand_computation_and_pin(tiny_clip):
    images = _images(4)
    metric = build_metric("alignment", MetricOptions(clip_model=tiny_clip, batch_size=3))
    result = metric.score(images, PROMPTS, "remain")
    assert isinstance(result, MetricResult) and result.name == "alignment"
    # By hand: 32x32 images need no resize or crop for the 32x32 tiny CLIP, only [0, 1] scaling and normalisation.
    model, tokenizer, _ = load_clip(tiny_clip)
    mean, std = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None], torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    with torch.no_grad():
        img = model.get_image_features(pixel_values=((images + 1) / 2 - mean) / std).pooler_output
        tokens = tokenizer(PROMPTS, padding=True, return_tensors="pt")
        txt = model.get_text_features(**tokens).pooler_output
    hand = F.cosine_similarity(img, txt, dim=-1)
    got = torch.tensor([s["clip_cosine"] for s in result.per_sample])
    torch.testing.assert_close(got, hand, atol=1e-5, rtol=0)
    assert bool(((got >= -1) & (got <= 1)).all())
    assert result.aggregate["alignment"] == pytest.approx(float(hand.double().mean()), abs=1e-6)
    assert result.aggregate["alignment_std"] == pytest.approx(float(hand.double().std(unbiased=False)), abs=1e-6)
    assert result.aggregate["alignment"] == pytest.approx(PINNED_ALIGNMENT, rel=1e-4)
    assert result.settings["clip_model"] == tiny_clip and len(result.settings["clip_config_sha256"]) == 16


def test_missing_clip_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--clip-model FOLDER"):
        load_clip(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="HF_HUB_OFFLINE=0"):
        load_clip("nobody-has/this-clip-model")


# ---------------------------------------------------------------------------------------------------------------------
# UA / RA


def test_ua_ra_arithmetic():
    assert unlearning_accuracy(["cat", "dog", "Cat", "random noise"], "cat") == pytest.approx(0.5)
    assert unlearning_accuracy(["dog", "dog"], "cat") == 1.0
    assert remaining_accuracy(["dog", "cat", "ship", "frog"], ["dog", "dog", None, "frog"]) == pytest.approx(2 / 3)
    assert remaining_accuracy(["dog"], [None]) != remaining_accuracy(["dog"], [None])  # NaN: nothing to score
    assert class_in_prompt("A photo of a Fire Truck at night", ["truck", "fire truck", "cat"]) == "fire truck"
    assert class_in_prompt("a dog chasing a cat", ["cat", "dog"]) == "dog"  # equally long: the earliest
    assert class_in_prompt("a catalogue page", ["cat"]) is None  # whole words only


def _classifier_images() -> torch.Tensor:
    # Noise and flat colours: the random-weight CLIP labels these differently, so the test sees several labels.
    g = torch.Generator().manual_seed(1)
    flat = (torch.rand(8, 3, 1, 1, generator=g) * 2 - 1).expand(8, 3, 32, 32)
    return torch.cat([torch.rand(4, 3, 32, 32, generator=g) * 2 - 1, flat])


def test_zero_shot_classifier_end_to_end(tiny_clip):
    classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    options = MetricOptions(clip_model=tiny_clip, classes=classes, target_class="dog", batch_size=5)
    metric = build_metric("classifier", options)
    images = _classifier_images()
    clip = load_clip(tiny_clip)
    labels = list(classes) + [NOISE_CLASS]
    text = clip.text_embeddings([f"a photo of a {c}." for c in labels])
    hand = [labels[i] for i in (clip.image_embeddings(images) @ text.T).argmax(-1).tolist()]
    assert len(set(hand)) >= 2

    forget = metric.score(images, ["a photo of a dog."] * len(images), "forget")
    assert [s["predicted"] for s in forget.per_sample] == hand
    assert forget.aggregate["ua"] == pytest.approx(unlearning_accuracy(hand, "dog"))
    assert forget.aggregate["noise_fraction"] == pytest.approx(hand.count(NOISE_CLASS) / len(hand))

    prompts = [f"a photo of a {classes[i % 10]}." for i in range(len(images) - 1)] + ["a photo of nothing"]
    remain = metric.score(images, prompts, "remain")
    truth = [classes[i % 10] for i in range(len(images) - 1)] + [None]
    assert [s["true"] for s in remain.per_sample] == truth
    assert remain.aggregate["ra"] == pytest.approx(remaining_accuracy(hand, truth))
    assert remain.aggregate["scored"] == len(images) - 1 and remain.aggregate["unscored"] == 1


def test_user_classifier_folder(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    labels = ["cat", "dog", "ship"]
    config = ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, num_labels=3, id2label=dict(enumerate(labels)),
                       label2id={n: i for i, n in enumerate(labels)})
    torch.manual_seed(0)
    model = ViTForImageClassification(config).eval()
    model.save_pretrained(tmp_path / "clf")
    (tmp_path / "clf" / "preprocessor_config.json").write_text(json.dumps(
        {"do_resize": True, "size": {"height": 16, "width": 16}, "do_normalize": True,
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    metric = ClassifierMetric(MetricOptions(classifier=str(tmp_path / "clf"), target_class="ship"))
    images = torch.randn(10, 3, 16, 16, generator=torch.Generator().manual_seed(3)).clamp(-1, 1)
    with torch.no_grad():  # mean/std 0.5 turn [0, 1] back into [-1, 1]: the pixels ARE the images
        hand = [labels[i] for i in model(pixel_values=images).logits.argmax(-1).tolist()]
    result = metric.score(images, ["a ship"] * 10, "forget")
    assert [s["predicted"] for s in result.per_sample] == hand
    assert result.aggregate["ua"] == pytest.approx(unlearning_accuracy(hand, "ship"))
    assert result.settings["labels"] == labels


def test_classifier_option_errors(tiny_clip):
    with pytest.raises(UserError, match="--classes"):
        build_metric("classifier", MetricOptions(clip_model=tiny_clip))
    with pytest.raises(UserError, match="not one of the classes"):
        build_metric("classifier", MetricOptions(clip_model=tiny_clip, classes=("cat", "dog"), target_class="cow"))
    metric = build_metric("classifier", MetricOptions(clip_model=tiny_clip, classes=("cat", "dog")))
    with pytest.raises(UserError, match="--target-class"):
        metric.score(_images(2), ["a cat", "a dog"], "forget")


# ---------------------------------------------------------------------------------------------------------------------
# FID / KID


def test_fid_kid_identical_and_different(tmp_path):
    real = _renders(120, seed=0)
    _write_pngs(real, tmp_path / "ref")
    options = MetricOptions(feature="oracle", reference=str(tmp_path / "ref"), kid_subset_size=500)
    fid, kid = build_metric("fid", options), build_metric("kid", options)
    prompts = ["x"] * 120
    same_fid = fid.score(real, prompts, "remain")
    assert same_fid.per_sample == [] and abs(same_fid.aggregate["fid"]) < 1e-3
    threes = _renders(120, seed=1, digit=3)
    assert fid.score(threes, prompts, "remain").aggregate["fid"] > 100

    same = kid.score(real, prompts, "remain").aggregate
    other = kid.score(threes, prompts, "remain").aggregate
    assert kid.settings()["kid_subset_size"] == 120  # min(500, n_real, n_fake)
    # With the whole set as the subset, the unbiased MMD² of a set with itself is exactly
    # 2·Σ_{i≠j}k/(m²(m-1)) − 2·Σ_i k_ii/m²: ≈ 0 next to a real difference.
    feats = fid_module.OracleFeatureSpace("cpu")(fid_module.quantize(real))
    k = (feats @ feats.T / feats.shape[1] + 1) ** 3
    m = len(k)
    closed = 2 * (k.sum() - k.diag().sum()) / (m * m * (m - 1)) - 2 * k.diag().sum() / m**2
    assert same["kid_mean"] == pytest.approx(float(closed), rel=1e-6)
    assert other["kid_mean"] > 0 and abs(same["kid_mean"]) < 0.1 * other["kid_mean"]


def test_reference_features_cached_once_and_reused(tmp_path, monkeypatch):
    _write_pngs(_renders(40, seed=0), tmp_path / "ref")
    calls = []
    loader = fid_module.load_reference_images
    monkeypatch.setattr(fid_module, "load_reference_images", lambda files, size: calls.append(len(files)) or
                        loader(files, size))
    options = MetricOptions(feature="oracle", reference=str(tmp_path / "ref"), cache_dir=str(tmp_path / "cache"),
                            batch_size=16)
    fake = _renders(30, seed=5)
    first = build_metric("fid", options).score(fake, ["x"] * 30, "remain")
    assert sum(calls) == 40 and len(calls) == 3  # batches of 16
    cached = list((tmp_path / "cache" / "reference-features").glob("*.safetensors"))
    assert len(cached) == 1 and first.settings["reference_cache"] == str(cached[0])
    calls.clear()
    second = build_metric("fid", options).score(fake, ["x"] * 30, "remain")  # a fresh metric: only the disk cache
    assert calls == [] and second.aggregate == first.aggregate
    # A different image size is a different entry; so is different folder content.
    build_metric("fid", options).score(F.interpolate(fake, size=(20, 20)), ["x"] * 30, "remain")
    assert sum(calls) == 40
    assert len(list((tmp_path / "cache" / "reference-features").glob("*.safetensors"))) == 2


def test_reference_and_feature_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="--reference"):
        build_metric("fid", MetricOptions(feature="oracle"))
    with pytest.raises(UserError, match="does not exist"):
        build_metric("kid", MetricOptions(feature="oracle", reference=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no PNG or JPEG"):
        build_metric("fid", MetricOptions(feature="oracle", reference=str(tmp_path / "empty")))
    _write_pngs(_renders(4, seed=0), tmp_path / "ref")
    with pytest.raises(UserError, match="unknown feature"):
        build_metric("fid", MetricOptions(feature="dino", reference=str(tmp_path / "ref")))
    # A wide image is centre-cropped to the target aspect, then resized: the middle column survives.
    wide = torch.zeros(20, 40, 3, dtype=torch.uint8)
    wide[:, 10:30] = 200
    Image.fromarray(wide.numpy()).save(tmp_path / "wide.png")
    loaded = fid_module.load_reference_images([tmp_path / "wide.png"], (10, 10))
    assert loaded.shape == (1, 3, 10, 10) and int(loaded.min()) == 200
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read the reference image"):
        fid_module.load_reference_images([tmp_path / "broken.png"], (10, 10))
    monkeypatch.setattr(fid_module, "_torch_fidelity_available", lambda: False)
    with pytest.raises(UserError, match="install the `inception` extra"):
        build_metric("fid", MetricOptions(feature="inception", reference=str(tmp_path / "ref")))


def test_clip_feature_fid_runs_on_tiny_clip(tiny_clip, tmp_path):
    real = _images(12, size=24, seed=0)
    _write_pngs(real, tmp_path / "ref")
    metric = build_metric("fid", MetricOptions(feature="clip", clip_model=tiny_clip, reference=str(tmp_path / "ref")))
    assert abs(metric.score(real, ["x"] * 12, "remain").aggregate["fid"]) < 1e-3
    assert metric.score(_images(12, size=24, seed=9) * 0.3, ["x"] * 12, "remain").aggregate["fid"] > 0
    assert metric.settings()["feature_weights"].startswith("clip:")


# ---------------------------------------------------------------------------------------------------------------------
# Oracle metric (digit world)


def test_parse_caption_inverts_compose_caption():
    rng = random.Random(0)
    for split in ("train", "test"):
        for _ in range(1500):
            cap = world.random_caption(rng, split, omit_prob=0.3)
            got = parse_caption(cap.text)
            assert (got.digit, got.colour, got.background) == (cap.digit, cap.colour, cap.background), cap.text
    # A background word inside a filler ("in a dark attic") is not a background request.
    assert parse_caption("a green digit two, drawn in chalk in a dark attic") == \
        world.Caption("a green digit two, drawn in chalk in a dark attic", digit=2, colour=1)


def test_oracle_metric_on_renders():
    from diffunlearn.data.prompts import eval_sets

    forget_caps, remain_caps = eval_sets("three", 60)
    metric = build_metric("oracle", MetricOptions(concept="three"))
    gen = torch.Generator().manual_seed(4)
    # Glyphs the oracle was trained on: it reads them all right, so the forget score of the concept is 1.
    forget_images, _ = world.render_captions(forget_caps, gen, split="train")
    forget = metric.score(forget_images, [c.text for c in forget_caps], "forget")
    assert forget.aggregate["forget_score"] >= 0.98
    assert all(s["shows_concept"] == (s["digit"] == "three") for s in forget.per_sample)

    remain_images, _ = world.render_captions(remain_caps, gen, split="test")
    # Twice the size: the metric resizes to the oracle's 16x16.
    big = F.interpolate(remain_images, scale_factor=2, mode="nearest")
    remain = metric.score(big, [c.text for c in remain_caps], "remain")
    assert remain.aggregate["alignment"] >= 0.95
    assert set(remain.aggregate) >= {"alignment", "alignment_digit", "alignment_colour", "alignment_background"}
    assert remain.per_sample[0]["requested"] == {a: world.VALUES[a][v] for a, v in remain_caps[0].requested().items()}


def test_oracle_metric_errors():
    with pytest.raises(UserError, match="unknown concept"):
        OracleMetric(MetricOptions(concept="eleven"))
    with pytest.raises(UserError, match="--concept"):
        OracleMetric(MetricOptions()).score(_renders(2, seed=0), ["a digit", "a digit"], "forget")
