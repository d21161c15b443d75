"""Checkpoints, resume and the NaN stop, on the tiny pixel model (bit-exact on CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from diffunlearn.config import build_config
from diffunlearn.core.checkpoints import latest_checkpoint
from diffunlearn.core.training import TrainingDiverged, unlearn
from diffunlearn.methods import get_method
from test_methods import fresh_adapter, snapshot, tiny_data


@pytest.mark.parametrize("name", ["rg", "rgd"])
def test_resume_reaches_the_same_weights_bit_for_bit(text_encoder, tmp_path, name):
    cfg = build_config(None, [f"method={name}", "steps=5", "batch_size=4", "lr=1e-3", "checkpoint_every=2"])
    straight = fresh_adapter(text_encoder)
    data = tiny_data(straight, n=12)
    unlearn(straight, get_method(name), cfg, *data, metrics_path=tmp_path / "a.jsonl", progress=False)

    # "Interrupted" after step 3: the newest checkpoint is step 2, and step 3 is in the log.
    first = fresh_adapter(text_encoder)
    stopped = build_config(None, [f"method={name}", "steps=3", "batch_size=4", "lr=1e-3", "checkpoint_every=2"])
    unlearn(first, get_method(name), stopped, *data, metrics_path=tmp_path / "b.jsonl", progress=False,
            checkpoint_dir=tmp_path / "ckpt")
    assert latest_checkpoint(tmp_path / "ckpt").name == "step-000002"
    resumed = fresh_adapter(text_encoder)  # base weights: the checkpoint must restore the trained ones
    history = unlearn(resumed, get_method(name), cfg, *data, metrics_path=tmp_path / "b.jsonl", progress=False,
                      checkpoint_dir=tmp_path / "ckpt", resume=True)
    a, b = snapshot(straight.unet), snapshot(resumed.unet)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5]
    lines = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    reference = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5]
    assert [r["forget_loss"] for r in lines] == [r["forget_loss"] for r in reference]
    assert latest_checkpoint(tmp_path / "ckpt").name == "step-000004"
    assert len(list((tmp_path / "ckpt").iterdir())) == 1  # older checkpoints are removed


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(text_encoder, tmp_path):
    cfg = build_config(None, ["method=graddiff", "steps=4", "batch_size=4", "lr=1e30", "checkpoint_every=1",
                              "forget_cap=none"])
    adapter = fresh_adapter(text_encoder)
    with pytest.raises(TrainingDiverged, match=r"step 2: a loss or gradient became NaN/inf.*step-000001"):
        unlearn(adapter, get_method("graddiff"), cfg, *tiny_data(adapter), metrics_path=tmp_path / "m.jsonl",
                progress=False, checkpoint_dir=tmp_path / "ckpt")
    kept = latest_checkpoint(tmp_path / "ckpt")
    assert kept.name == "step-000001"
    state = json.loads((kept / "state.json").read_text())
    assert state["step"] == 1 and state["cursor"] == 4
    from safetensors.torch import load_file

    weights = load_file(str(kept / "trainable.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 1


def test_damaged_checkpoint_is_a_clear_error(text_encoder, tmp_path):
    from diffunlearn.errors import UserError

    cfg = build_config(None, ["method=rg", "steps=2", "batch_size=4", "checkpoint_every=1"])
    adapter = fresh_adapter(text_encoder)
    data = tiny_data(adapter)
    unlearn(adapter, get_method("rg"), cfg, *data, progress=False, checkpoint_dir=tmp_path / "ckpt")
    (latest_checkpoint(tmp_path / "ckpt") / "optimizer.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="is damaged"):
        unlearn(fresh_adapter(text_encoder), get_method("rg"), cfg, *data, progress=False,
                checkpoint_dir=tmp_path / "ckpt", resume=True)
