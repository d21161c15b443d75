"""A method owns its procedure (issue 14 §2): the forget objective is an object the loop binds (ESD,
SalUn and fine-tuning live in their own files), and a method that takes no gradient steps brings
its own ``procedure`` and still gets a complete run folder from the one run path."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from diffunlearn import methods as registry
from diffunlearn.config import build_config
from diffunlearn.jobs.run import run_unlearning
from diffunlearn.methods import METHODS, Method, get_method
from diffunlearn.methods.objectives import ASCENT, NO_FORGET
from diffunlearn.models import resolve_model_folder

QUICK = ["steps=2", "num_pairs=8", "batch_size=4", "eval_prompts=4", "eval_steps=2", "data_steps=2", "threads=1",
         "diagnose=false"]


def test_each_method_names_its_objective_and_hooks():
    assert get_method("rg").forget is ASCENT and get_method("ft").forget is NO_FORGET
    assert (get_method("esd-u").forget_loss, get_method("esd-x").forget_loss, get_method("salun").forget_loss) == (
        "esd", "esd", "remap")
    assert get_method("salun").saliency and not get_method("rg").saliency
    assert [m for m, v in METHODS.items() if v.needs_reference] == ["esd-u", "esd-x", "salun"]
    # Every registered method uses the gradient loop but the closed-form UCE (tests/test_uce.py).
    assert [m for m, v in METHODS.items() if v.procedure is not None] == ["uce"]
    cfg = build_config(None, ["margin=0.5"])
    assert ASCENT.active(0.4, cfg) and not ASCENT.active(0.6, cfg) and not NO_FORGET.active(0.0, cfg)


def test_a_closed_form_method_runs_without_the_optimizer(tmp_path, monkeypatch):
    seen = {}

    def halve(adapter, method, cfg, forget_x0, forget_cond, remain_x0, remain_cond, **run):
        seen.update(method=method.name, forget=len(forget_x0), remain=len(remain_x0), run=sorted(run))
        with torch.no_grad():
            for p in adapter.unet.parameters():
                p.mul_(0.5)  # an edit in closed form: no gradient, no optimizer state
        return [{"step": 1, "forget_loss": 0.0, "remain_loss": 0.0}]

    toy = Method(name="halve", summary="halve every weight (test)", uses_remain=False, remain_scope="batch",
                 combine=lambda *args, **kwargs: None, procedure=halve)
    monkeypatch.setitem(registry.METHODS, "halve", toy)
    out = tmp_path / "run"
    results = run_unlearning(build_config(None, ["method=halve", *QUICK]), out, False, "test", progress=False)
    assert seen == {"method": "halve", "forget": 8, "remain": 8,
                    "run": ["checkpoint_dir", "metrics_path", "parallel", "progress", "resume"]}
    assert results["training"]["steps"] == 1 and 0.0 <= results["forget_score"] <= 1.0
    base = load_file(str(resolve_model_folder("embedded:digits") / "unet" / "diffusion_pytorch_model.safetensors"))
    edited = load_file(str(out / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    name = next(iter(edited))
    torch.testing.assert_close(edited[name], base[name] * 0.5)
    assert json.loads((out / "results.json").read_text())["method"] == "halve"
