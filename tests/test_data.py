"""Generated image sets: one seeded image per prompt, cached with a manifest, reused only on a match."""

from __future__ import annotations

import json

import pytest
import torch

from diffunlearn.data.images import generate_image_set
from diffunlearn.errors import UserError
from diffunlearn.utils import folder_fingerprint


def _counted(adapter, tmp_path) -> tuple[str, list]:
    """The adapter's model identity (saved under tmp_path) and a list that records the prompts of
    every sampler call from now on."""
    model_dir = tmp_path / "model"
    adapter.save(model_dir)
    calls = []
    original = adapter.sample

    def counting_sample(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    adapter.sample = counting_sample
    return folder_fingerprint(model_dir), calls


def test_image_set_is_cached_and_reused_only_when_the_manifest_matches(tiny_adapter, tmp_path):
    model_id, calls = _counted(tiny_adapter, tmp_path)
    prompts = ["a red three", "a blue seven on a white background", "a digit"]
    seeds = [10, 11, 12]
    cache = tmp_path / "cache"
    first = generate_image_set(tiny_adapter, model_id, prompts, seeds, cache, steps=3, guidance=2.0, progress=False)
    assert first.shape == (3, 3, 16, 16) and len(calls) == 1
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["prompts"] == prompts and manifest["seeds"] == seeds
    assert manifest["steps"] == 3 and manifest["guidance"] == 2.0 and len(manifest["image_sha256"]) == 3
    again = generate_image_set(tiny_adapter, model_id, prompts, seeds, cache, steps=3, guidance=2.0, progress=False)
    assert len(calls) == 1 and torch.equal(first, again)
    # Another guidance is another request: regenerated, not silently reused.
    generate_image_set(tiny_adapter, model_id, prompts, seeds, cache, steps=3, guidance=4.0, progress=False)
    assert len(calls) == 2
    # A damaged or missing image is regenerated alone (resume); the others are kept.
    (cache / "images" / "00001.png").write_bytes(b"garbage")
    (cache / "images" / "00002.png").unlink()
    (cache / "manifest.json").unlink()
    resumed = generate_image_set(tiny_adapter, model_id, prompts, seeds, cache, steps=3, guidance=4.0, progress=False)
    assert len(calls) == 3 and calls[-1] == prompts[1:]
    fresh = generate_image_set(tiny_adapter, model_id, prompts, seeds, tmp_path / "fresh", steps=3, guidance=4.0,
                               progress=False)
    assert torch.equal(resumed, fresh)
    # A folder the user named is never replaced by another request.
    with pytest.raises(UserError, match="other settings"):
        generate_image_set(tiny_adapter, model_id, prompts, seeds, cache, steps=4, guidance=4.0, progress=False,
                           replace=False)


def test_an_image_set_copies_what_a_donor_set_holds_and_samples_only_the_rest(tiny_adapter, tmp_path):
    model_id, calls = _counted(tiny_adapter, tmp_path)
    prompts = ["a red three", "a blue seven on a white background", "a digit"]
    generate_image_set(tiny_adapter, model_id, prompts, [10, 11, 12], tmp_path / "donor", steps=3, guidance=2.0,
                       progress=False)
    # Prompt 1 changes; prompt 2 keeps its text but not its seed: both are sampled, prompt 0 is copied.
    second = ["a red three", "a green seven on a white background", "a digit"]
    images = generate_image_set(tiny_adapter, model_id, second, [10, 11, 13], tmp_path / "second", steps=3,
                                guidance=2.0, progress=False, donors=[tmp_path / "donor", tmp_path / "missing"])
    assert calls[1:] == [second[1:]]
    donor_png = (tmp_path / "donor" / "images" / "00000.png").read_bytes()
    assert (tmp_path / "second" / "images" / "00000.png").read_bytes() == donor_png
    manifest = json.loads((tmp_path / "second" / "manifest.json").read_text())
    assert manifest["prompts"] == second and len(manifest["image_sha256"]) == 3
    fresh = generate_image_set(tiny_adapter, model_id, second, [10, 11, 13], tmp_path / "fresh", steps=3,
                               guidance=2.0, progress=False)
    assert (images - fresh).abs().max() < 2e-2  # a copied image equals a sampled one up to batch rounding
    # Another sampler setting (steps) makes the donor's images unusable: everything is sampled.
    generate_image_set(tiny_adapter, model_id, second, [10, 11, 13], tmp_path / "third", steps=4, guidance=2.0,
                       progress=False, donors=[tmp_path / "donor"])
    assert calls[-1] == second


def test_each_image_depends_only_on_its_prompt_and_seed(tiny_adapter):
    both = tiny_adapter.sample(["a red three", "a blue seven"], [5, 6], steps=3, guidance=2.0)
    alone = tiny_adapter.sample(["a blue seven"], [6], steps=3, guidance=2.0)
    assert (both[1] - alone[0]).abs().max() < 2e-2  # equal up to batch-size-dependent float rounding
    other_seed = tiny_adapter.sample(["a blue seven"], [7], steps=3, guidance=2.0)
    assert not torch.allclose(other_seed[0], alone[0])
