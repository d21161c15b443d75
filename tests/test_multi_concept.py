"""Issue 16 §1: several concepts in one run on the embedded digit world: the prompt sets (no prompt
shows another listed concept; one concept's prompts are unchanged), the run end to end (k forget
gradients a step, per-concept losses and scores), interleaved batches, and the refusals."""

from __future__ import annotations

import json

import pytest

from diffunlearn import cli
from diffunlearn.config import build_config
from diffunlearn.data.prompts import build_pairs, eval_sets
from diffunlearn.data.training import training_prompt_sets, training_prompts
from diffunlearn.worlds import digits as world

CONCEPTS = ["three", "red", "seven"]


def shows(caption, concept: str) -> bool:
    attribute = world.concept_attribute(concept)
    return getattr(caption, attribute) == world.VALUES[attribute].index(concept)


def test_no_prompt_shows_another_listed_concept_and_one_concept_is_unchanged():
    cfg = build_config(None, ["concept=three,red,seven", "num_pairs=120"])
    forget_sets, remain = training_prompt_sets(cfg)
    assert [len(f) for f in forget_sets] == [120, 120, 120] and len(remain) == 120
    for concept, captions in zip(CONCEPTS, forget_sets):
        assert all(shows(c, concept) for c in captions)
        assert not any(shows(c, other) for c in captions for other in CONCEPTS if other != concept)
    assert not any(shows(c, x) for c in remain for x in CONCEPTS)
    # Remain row i is the pair of row i of concept i mod 3: the same template and filler.
    forget, paired = training_prompts(cfg)
    assert forget[4] == forget_sets[1][4] and paired == remain
    assert forget[4].text.split()[-2:] == remain[4].text.split()[-2:]
    # The held-out sets likewise: each concept's forget set, then a remain set with none of them.
    test_forget, test_remain = eval_sets("three,red,seven", 50)
    assert len(test_forget) == 150 and len(test_remain) == 50
    assert all(shows(c, CONCEPTS[i // 50]) for i, c in enumerate(test_forget))
    assert not any(shows(c, x) for c in test_remain for x in CONCEPTS)
    assert sum(c.digit is not None for c in test_remain) > 25          # the remain set still draws digits
    # One concept: exactly the prompts a one-concept run has always had.
    one = build_config(None, ["concept=three", "num_pairs=120"])
    assert training_prompts(one) == build_pairs("three", 120, "diverse", "train", 0)


def run(*args: str) -> int:
    return cli.main([*args, "--quiet"])


COMMON = ["steps=4", "num_pairs=16", "batch_size=8", "eval_prompts=8", "eval_steps=2", "data_steps=2", "threads=1"]


def test_three_concepts_run_end_to_end_with_per_concept_scores(tmp_path):
    # (The other rules' k-way combine is tested on random gradients in test_kway_rules.py.)
    method = "rg"
    out = tmp_path / method
    assert run("unlearn", "concept=three,red,seven", f"method={method}", *COMMON, "--out", str(out)) == 0
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["forget_scores"]) == sorted(CONCEPTS)
    assert all(0 <= v <= 1 for v in results["forget_scores"].values())
    assert results["forget_score"] == pytest.approx(sum(results["forget_scores"].values()) / 3)
    assert {f"forget:{c}" for c in CONCEPTS} <= set(results["metrics"]["oracle"])
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 4 and all(sorted(s["forget_losses"]) == sorted(CONCEPTS) for s in steps)
    assert all(s["forget_loss"] == pytest.approx(sum(s["forget_losses"].values()) / 3) for s in steps)
    assert all(len(s["cos_per_concept"]) == 3 and s["cos"] == min(s["cos_per_concept"]) for s in steps)
    assert sorted(p.name for p in (out / "data").iterdir()) == ["forget-red", "forget-seven", "forget-three", "remain"]


def test_interleaved_batches_take_one_concept_a_step_and_admit_one_gradient_rules(tmp_path):
    out = tmp_path / "interleaved"
    assert run("unlearn", "concept=three,red", "method=rg-opt", "forget_batches=interleaved", *COMMON,
               "--out", str(out)) == 0
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [list(s["forget_losses"]) for s in steps] == [["three"], ["red"], ["three"], ["red"]]


@pytest.mark.parametrize("args, fragment", [
    (["method=rg-opt"], "forget_batches=interleaved"),
    (["method=salun"], "saliency mask"),
    (["margin_mode=relative"], "margin_mode=absolute"),
    (["concept=three,three"], "twice"),
    (["concept=three,,red"], "separated by commas"),
    (["concept=three,violet"], "unknown concept 'violet'"),
    (["model=embedded:digits-class", "concept=three,seven"], "one class"),
])
def test_what_several_concepts_cannot_do_is_refused_with_exit_2(args, fragment, tmp_path, capsys):
    base = ["concept=three,red"] if not any(a.startswith("concept=") for a in args) else []
    assert run("unlearn", *base, *args, "steps=1", "--out", str(tmp_path / "bad")) == 2
    assert fragment in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_the_artists_recipe_runs_on_the_tiny_stable_diffusion_pipeline(tiny_sd_folder, tmp_path):
    """configs/sd-artists.yaml: three artists' styles at once as a LoRA, then UCE on the same list."""
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / "sd-artists.yaml"
    tiny = ["num_pairs=4", "batch_size=4", "steps=2", "data_steps=2", "eval_steps=2", "eval_prompts=2",
            "mixed_precision=no", "checkpoint_every=0", "threads=1", "lr=1e-2"]
    out = tmp_path / "artists"
    assert run("unlearn", str(config), f"model={tiny_sd_folder}", *tiny, "--out", str(out)) == 0
    assert sorted(p.name for p in (out / "data").iterdir()) == ["forget-monet", "forget-picasso", "forget-van-gogh",
                                                                 "remain"]
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(s["forget_losses"]) for s in steps] == [["monet", "picasso", "van-gogh"]] * 2
    assert (out / "model" / "pytorch_lora_weights.safetensors").is_file()
    remain = json.loads((out / "data" / "remain" / "request.json").read_text())["prompts"]
    assert not any(w in p for p in remain for w in ("Gogh", "Monet", "Picasso"))
    uce = tmp_path / "uce"
    assert run("unlearn", str(config), f"model={tiny_sd_folder}", *tiny, "method=uce", "selection=full",
               "--out", str(uce)) == 0
    record = json.loads((uce / "metrics.jsonl").read_text())
    assert "by Claude Monet" in record["erased_texts"] and record["edited_projections"] > 0


def test_the_bench_measures_k_forget_gradients():
    from diffunlearn.errors import UserError
    from diffunlearn.jobs import bench

    results = bench.run_bench("embedded:digits", ("rg",), batch_size=2, steps=1, warmup=0, progress=False, concepts=3)
    assert results["rg"]["step_seconds"] > 0 and results["rg"]["projected_fraction"] in (0.0, 1.0)
    assert results["rg"]["peak_memory_mb"] > 0 and results["rg"]["device"] == "cpu"   # the digit model, measured
    with pytest.raises(UserError, match="--concepts must be between 1 and 4"):
        bench.run_bench("embedded:digits", ("rg",), concepts=5, progress=False)


def test_a_file_of_concepts_is_the_concept_list(tmp_path):
    path = tmp_path / "concepts.txt"
    path.write_text("three\n# the colour next\nred   # a modifier\n\nseven\n")
    assert build_config(None, [f"concept=@{path}"]).concepts == ["three", "red", "seven"]
    from diffunlearn.errors import UserError

    with pytest.raises(UserError, match="cannot be read"):
        build_config(None, [f"concept=@{tmp_path / 'missing.txt'}"])
