"""Shared fixtures: tiny REAL components built offline with fixed seeds (diffusers' dummy-component idea)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Every process a test starts inherits one thread too (scripts, workers, `accelerate launch`): two
# threads beside the other test worker on a 2-core machine spin-wait and run several times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: E402

from diffunlearn.models.pixel import PixelTextToImage  # noqa: E402
from diffunlearn.models.text import FrozenTextEncoder  # noqa: E402

torch.set_num_threads(1)  # 2 threads on a shared 2-core machine stall tiny-model tests (spin-waits)


@pytest.fixture(scope="session")
def text_encoder() -> FrozenTextEncoder:
    return FrozenTextEncoder()


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=2, cross_attention_dim=384,
        addition_embed_type="text", addition_embed_type_num_heads=2)


@pytest.fixture()
def tiny_adapter(text_encoder) -> PixelTextToImage:
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    return PixelTextToImage(tiny_unet(0), scheduler, text_encoder)


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory):
    """The ``tiny`` Stable Diffusion preset (seed 0) saved as a diffusers pipeline folder."""
    from diffunlearn.models.presets import init_pipeline

    return init_pipeline("tiny", tmp_path_factory.mktemp("tiny-sd") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_sd3_folder(tmp_path_factory):
    """The ``sd3-tiny`` preset (seed 0): an SD3 pipeline folder with two tiny CLIP encoders, no T5."""
    from diffunlearn.models.presets import init_pipeline

    return init_pipeline("sd3-tiny", tmp_path_factory.mktemp("tiny-sd3") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory):
    """The ``sdxl-tiny`` preset (seed 0): an SDXL pipeline folder with two tiny CLIP encoders."""
    from diffunlearn.models.presets import init_pipeline

    return init_pipeline("sdxl-tiny", tmp_path_factory.mktemp("tiny-sdxl") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_flux_folder(tmp_path_factory):
    """The ``flux-tiny`` preset (seed 0): a FLUX pipeline folder (guidance embedding, tiny CLIP and T5)."""
    from diffunlearn.models.presets import init_pipeline

    return init_pipeline("flux-tiny", tmp_path_factory.mktemp("tiny-flux") / "model", seed=0)


# The longest tests (tens of seconds each, most of them subprocesses) run first: pytest-xdist hands out
# tests in collection order, so a long test collected last would run alone at the end and leave the
# other workers idle. Order only; every test still runs.
SLOW_FIRST = ("test_gpu_check_script_runs_small_on_cpu", "test_families_parallel.py", "test_leaderboard.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: 0 if any(s in item.nodeid for s in SLOW_FIRST) else 1)  # stable: same order else


@pytest.fixture
def crash_after_checkpoint(monkeypatch):
    """``crash(module, name, at_step=None)``: replace the checkpoint writer ``module.name`` with one that
    writes the checkpoint and then raises KeyboardInterrupt (at step ``at_step``, its second argument;
    ``None`` = at the first checkpoint), as a user's Ctrl-C right after a save would. Returns the real
    writer; the fixture's monkeypatch puts it back."""
    def crash(module, name: str, at_step: int | None = None):
        real = getattr(module, name)

        def save_then_crash(*args, **kwargs):
            saved = real(*args, **kwargs)
            if at_step is None or args[1] == at_step:
                raise KeyboardInterrupt
            return saved

        monkeypatch.setattr(module, name, save_then_crash)
        return real

    return crash
