"""The class-conditional adapter (a diffusers UNet2DModel with class embeddings): prompts to labels,
the null class, saving and loading, sampling, parameter selection and one unlearning step per method."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel  # noqa: E402

from diffunlearn.config import build_config  # noqa: E402
from diffunlearn.core.training import unlearn  # noqa: E402
from diffunlearn.errors import UserError  # noqa: E402
from diffunlearn.methods import get_method  # noqa: E402
from diffunlearn.models import EMBEDDED_CLASS, load_adapter  # noqa: E402
from diffunlearn.models.classcond import ClassConditionalAdapter, build_class_unet  # noqa: E402

NAMES = ("cat", "Dog", "ship")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread for these ~46 k-parameter models: on a loaded 2-core machine, OpenMP threads
    waiting for each other turned 0.2 s tests into 20 s ones. Restored for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_unet(num_classes: int = 3, seed: int = 0, null: bool = True) -> UNet2DModel:
    """8x8, ~46 k parameters; ``num_classes + 1`` embeddings with ``null``, else exactly ``num_classes``."""
    return build_class_unet(num_classes if null else num_classes - 1, sample_size=8, block_out_channels=(8, 16),
                            seed=seed).eval()


def tiny_adapter(seed: int = 0, names=NAMES, **scheduler) -> ClassConditionalAdapter:
    return ClassConditionalAdapter(tiny_unet(len(names), seed), DDPMScheduler(num_train_timesteps=100, **scheduler),
                                   names)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def test_build_class_unet_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_class_unet(10, seed=5)
    after = torch.rand(3)
    b = build_class_unet(10, seed=5)
    c = build_class_unet(10, seed=6)
    assert torch.equal(after, expected)
    assert a.config.num_class_embeds == 11 and a.config.sample_size == 16 and a.config.in_channels == 3
    assert 1_000_000 <= sum(p.numel() for p in a.parameters()) <= 2_000_000
    sa, sb, sc = snapshot(a), snapshot(b), snapshot(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_encode_prompts_maps_names_case_indices_and_null():
    adapter = tiny_adapter()
    assert adapter.class_names == NAMES and adapter.null_class == 3
    assert adapter.num_train_timesteps == 100 and adapter.image_size == 8 and adapter.channels == 3
    labels = adapter.encode_prompts(["cat", " DOG ", "Ship", "dog", "0", "2", "", "  "])
    assert labels.dtype == torch.long
    assert labels.tolist() == [0, 1, 2, 1, 0, 2, 3, 3]
    # The condition is indexable by rows and movable, as the training loop needs.
    assert labels[torch.tensor([6, 1])].tolist() == [3, 1] and labels[1:3].to("cpu").tolist() == [1, 2]


@pytest.mark.parametrize("prompt", ["horse", "3", "-1", "cat dog"])
def test_encode_prompts_rejects_unknown_classes(prompt):
    with pytest.raises(UserError) as err:
        tiny_adapter().encode_prompts(["cat", prompt])
    assert repr(prompt) in str(err.value) and "cat, Dog, ship" in str(err.value)


def test_null_class_follows_the_embedding_count():
    scheduler = DDPMScheduler(num_train_timesteps=100)
    with_null = ClassConditionalAdapter(tiny_unet(3), scheduler, NAMES)
    without = ClassConditionalAdapter(tiny_unet(3, null=False), scheduler, NAMES)
    assert with_null.unet.config.num_class_embeds == 4 and with_null.null_class == 3
    assert without.unet.config.num_class_embeds == 3 and without.null_class is None
    assert without.encode_prompts(["ship", "1"]).tolist() == [2, 1]
    with pytest.raises(UserError, match="no null class"):
        without.encode_prompts([""])
    with pytest.raises(UserError, match="4 class embeddings but 2 class names"):
        ClassConditionalAdapter(tiny_unet(3), scheduler, ["a", "b"])
    with pytest.raises(UserError, match="not class-conditional"):
        ClassConditionalAdapter(UNet2DModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
                                            down_block_types=("DownBlock2D", "DownBlock2D"),
                                            up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8),
                                scheduler, NAMES)
    with pytest.raises(UserError, match="differ ignoring case"):
        ClassConditionalAdapter(tiny_unet(3), scheduler, ["cat", "CAT ", "dog"])


def test_renaming_classes_updates_the_lookup():
    adapter = tiny_adapter(names=("0", "1", "2"))
    adapter.class_names = ["zero", "one", "two"]
    assert adapter.class_names == ("zero", "one", "two") and adapter.null_class == 3
    assert adapter.encode_prompts(["TWO", "zero", "1", ""]).tolist() == [2, 0, 1, 3]
    with pytest.raises(UserError, match="needs 3 class names"):
        adapter.class_names = ["a", "b"]
    assert adapter.class_names == ("zero", "one", "two")


def test_encode_images_checks_the_shape():
    adapter = tiny_adapter()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert adapter.encode_images(x) is x
    for bad in (torch.zeros(2, 1, 8, 8), torch.zeros(2, 3, 16, 16)):
        with pytest.raises(UserError, match=r"\(N, 3, 8, 8\)"):
            adapter.encode_images(bad)


def test_add_noise_and_targets_use_the_scheduler():
    adapter = tiny_adapter()
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 3, 8, 8, generator=gen), torch.randn(3, 3, 8, 8, generator=gen)
    t = torch.tensor([0, 50, 99])
    torch.testing.assert_close(adapter.add_noise(x0, noise, t), adapter.scheduler.add_noise(x0, noise, t))
    assert torch.equal(adapter.prediction_target(x0, noise, t), noise)
    v = tiny_adapter(prediction_type="v_prediction")
    torch.testing.assert_close(v.prediction_target(x0, noise, t), v.scheduler.get_velocity(x0, noise, t))


def test_save_then_load_adapter_round_trip(tmp_path):
    adapter = tiny_adapter(seed=3)
    adapter.save(tmp_path / "model")
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert index["_diffunlearn_adapter"] == "class" and index["_diffunlearn_classes"] == list(NAMES)
    assert index["_diffunlearn_null_class"] is True and index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert (tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded, folder = load_adapter(str(tmp_path / "model"))
    assert isinstance(loaded, ClassConditionalAdapter) and folder == tmp_path / "model"
    assert loaded.class_names == NAMES and loaded.null_class == 3 and loaded.num_train_timesteps == 100
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(4, 3, 8, 8, generator=gen), torch.tensor([1, 20, 50, 99])
    labels = adapter.encode_prompts(["cat", "dog", "ship", ""])
    with torch.no_grad():
        assert torch.equal(adapter.predict_noise(x, t, labels), loaded.predict_noise(x, t, labels))


def test_load_diffusers_ddpm_pipeline_folder_without_names(tmp_path):
    # A diffusers class-conditional DDPM pipeline folder: no diffunlearn keys, a DDIM scheduler config.
    folder = tmp_path / "pipe"
    tiny_unet(3).save_pretrained(folder / "unet", safe_serialization=True)
    DDIMScheduler(num_train_timesteps=100).save_pretrained(folder / "scheduler")
    index = {"_class_name": "DDIMPipeline", "unet": ["diffusers", "UNet2DModel"],
             "scheduler": ["diffusers", "DDIMScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    loaded, _ = load_adapter(str(folder))
    assert loaded.class_names == ("0", "1", "2", "3") and loaded.null_class is None
    assert isinstance(loaded.scheduler, DDPMScheduler) and loaded.num_train_timesteps == 100
    (folder / "model_index.json").write_text(json.dumps({**index, "_diffunlearn_null_class": True}))
    loaded, _ = load_adapter(str(folder))
    assert loaded.class_names == ("0", "1", "2") and loaded.null_class == 3


def test_load_failures_are_user_errors(tmp_path):
    folder = tmp_path / "model"
    tiny_adapter().save(folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"truncated")
    with pytest.raises(UserError, match="restore or rebuild"):
        load_adapter(str(folder))
    with pytest.raises(UserError, match="expected unet/ and scheduler/"):
        ClassConditionalAdapter.from_pretrained(tmp_path / "nothing")


def test_embedded_class_model_name_resolves_or_explains(monkeypatch, tmp_path):
    import diffunlearn.worlds.assets as assets

    monkeypatch.setattr(assets, "ASSETS", tmp_path)
    with pytest.raises(UserError, match="train-base --track class"):
        load_adapter(EMBEDDED_CLASS)
    tiny_adapter().save(tmp_path / "digits-class")
    loaded, folder = load_adapter(EMBEDDED_CLASS)
    assert folder == tmp_path / "digits-class" and loaded.class_names == NAMES


def test_sample_shape_range_and_seed_independence_from_batching():
    adapter = tiny_adapter(seed=1)
    adapter.unet.train()
    prompts, seeds = ["cat", "dog", "ship", "dog"], [11, 12, 13, 14]
    images = adapter.sample(prompts, seeds, steps=4, guidance=3.0, batch_size=4)
    assert images.shape == (4, 3, 8, 8) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0
    assert adapter.unet.training  # the mode is restored
    # Image 2 alone, in batches of 3 and with other neighbours: the same image.
    alone = adapter.sample(["ship"], [13], steps=4, guidance=3.0, batch_size=1)
    split = adapter.sample(prompts, seeds, steps=4, guidance=3.0, batch_size=3)
    others = adapter.sample(["cat", "ship"], [99, 13], steps=4, guidance=3.0)
    torch.testing.assert_close(alone[0], images[2], rtol=0, atol=1e-5)
    torch.testing.assert_close(split, images, rtol=0, atol=1e-5)
    torch.testing.assert_close(others[1], images[2], rtol=0, atol=1e-5)
    # Guidance changes the image; different seeds give different images.
    plain = adapter.sample(prompts, seeds, steps=4, guidance=1.0)
    assert (plain - images).abs().max() > 1e-3
    assert (images[1] - images[3]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="one seed per prompt"):
        adapter.sample(prompts, seeds[:2], steps=4)


def test_sample_without_null_class_ignores_guidance():
    adapter = ClassConditionalAdapter(tiny_unet(3, null=False), DDPMScheduler(num_train_timesteps=100), NAMES)
    a = adapter.sample(["cat", "ship"], [1, 2], steps=3, guidance=5.0)
    b = adapter.sample(["cat", "ship"], [1, 2], steps=3, guidance=1.0)
    assert a.shape == (2, 3, 8, 8) and torch.equal(a, b)


def test_trainable_parameters_selection():
    adapter = tiny_adapter()
    adapter.unet.requires_grad_(False)
    everything = [n for n, _ in adapter.unet.named_parameters()]
    for selection in ("full", "non-cross-attention"):
        chosen = adapter.trainable_parameters(selection)
        assert [n for n, _ in chosen] == everything and all(p.requires_grad for _, p in chosen)
    with pytest.raises(UserError, match="no cross-attention"):
        adapter.trainable_parameters("cross-attention")
    with pytest.raises(UserError, match="full or non-cross-attention"):
        adapter.trainable_parameters("lora")
    with pytest.raises(UserError, match="unknown parameter selection"):
        adapter.trainable_parameters("everything")


def tiny_data(adapter: ClassConditionalAdapter, n: int = 8):
    """Forget class "cat" paired with the other classes, on random images."""
    gen = torch.Generator().manual_seed(0)
    fx = torch.rand(n, 3, 8, 8, generator=gen) * 2 - 1
    rx = torch.rand(n, 3, 8, 8, generator=gen) * 2 - 1
    remain = [("dog", "ship")[i % 2] for i in range(n)]
    return fx, adapter.encode_prompts(["cat"] * n), rx, adapter.encode_prompts(remain)


@pytest.mark.parametrize("name", ["rg", "rgd", "graddiff", "ga", "ft", "salun", "esd-u"])
def test_one_unlearning_step_per_method(name):
    # `concept` is irrelevant to `unlearn` (the default model is the digit world, whose words validate).
    # No hinge: an untrained UNet's ε-MSE sits near the margin, where the hinge may switch the forget term off.
    cfg = build_config(None, ["steps=1", "batch_size=4", "lr=1e-3", "diagnose=false", f"method={name}",
                              "concept=three", "forget_cap=none"])
    runs = []
    for _ in range(2):
        adapter = tiny_adapter(seed=0)
        before = snapshot(adapter.unet)
        history = unlearn(adapter, get_method(name), cfg, *tiny_data(adapter), progress=False)
        after = snapshot(adapter.unet)
        changed = [k for k in after if not torch.equal(before[k], after[k])]
        assert len(changed) >= 0.5 * len(after), f"{name} changed only {len(changed)} of {len(after)} tensors"
        assert len(history) == 1
        assert torch.isfinite(torch.tensor([history[0]["forget_loss"], history[0]["remain_loss"]])).all()
        assert history[0]["forget_loss"] > 0 and history[0]["remain_loss"] > 0
        assert history[0]["forget_active"] == get_method(name).uses_forget
        runs.append(after)
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_channels_last_images_give_the_optimizer_gradients_in_the_parameters_strides(monkeypatch):
    """A convolution fed channels-last images returns its weight gradient channels-last; CUDA's fused
    Adam refuses a gradient whose strides differ from its parameter's (the GPU check's class run
    failed so). The loop hands the optimizer every gradient in its parameter's strides, and the
    gradients are those of contiguous images up to float rounding."""
    from diffunlearn.core import training

    cfg = build_config(None, ["steps=2", "batch_size=4", "lr=1e-3", "diagnose=false", "method=rg",
                              "concept=three", "forget_cap=none"])
    seen, grads = [], []
    real_adam = training.adam

    def checking_adam(params, lr):
        optimizer = real_adam(params, lr)
        step = optimizer.step

        def checked_step(*args, **kwargs):
            seen.append(sum(p.grad.stride() != p.stride() for p in params))
            grads.append([p.grad.clone() for p in params])
            return step(*args, **kwargs)

        optimizer.step = checked_step
        return optimizer

    monkeypatch.setattr(training, "adam", checking_adam)
    for layout in (torch.contiguous_format, torch.channels_last):
        adapter = tiny_adapter(seed=0)
        fx, fc, rx, rc = tiny_data(adapter)
        fx, rx = fx.to(memory_format=layout), rx.to(memory_format=layout)
        assert fx.is_contiguous() == (layout == torch.contiguous_format)
        unlearn(adapter, get_method("rg"), cfg, fx, fc, rx, rc, progress=False)
    assert seen == [0, 0, 0, 0]  # two steps each, every gradient in its parameter's strides
    first, last = grads[0], grads[2]  # step 1 of each layout: same weights, same batch
    gap = torch.sqrt(sum((a - b).double().square().sum() for a, b in zip(first, last)))
    size = torch.sqrt(sum(a.double().square().sum() for a in first))
    assert gap.item() < 1e-4 * size.item()
