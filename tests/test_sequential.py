"""Issue 16 §2: requests served one after another. A run on a previous run's model continues its
lineage (model/lineage.json, results.json, the model card); `demo --sequential` chains the requests,
scores every concept after each, keeps the erased concepts out of later training prompts, and with
--protect keeps them in the forget objective."""

from __future__ import annotations

import json

import yaml

from diffunlearn import cli

TINY = ["steps=1", "num_pairs=8", "batch_size=8", "eval_prompts=4", "eval_steps=2", "data_steps=2", "threads=1"]


def test_the_sequential_demo_chains_requests_and_scores_every_concept(tmp_path, capsys):
    out = tmp_path / "seq"
    assert cli.main(["demo", "--sequential", "three,red", "--methods", "rg", "--protect", *TINY, "--out", str(out),
                     "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    served = [(r["method"], r["served"]) for r in summary["rows"]]
    assert served == [("base", []), ("rg", ["three"]), ("rg", ["three", "red"]), ("rg+protect", ["three"]),
                      ("rg+protect", ["three", "red"])]
    assert all(sorted(r["forget_scores"]) == ["red", "three"] and 0 <= r["alignment"] <= 1 for r in summary["rows"])
    assert (out / "sequential.png").stat().st_size > 10_000 and "| rg+protect | three, red |" in (
        out / "sequential.md").read_text()
    # Request 2 starts from request 1's model, keeps "three" out of its prompts, and records both requests.
    second = out / "rg" / "request-2-red"
    cfg = yaml.safe_load((second / "config.yaml").read_text())
    assert cfg["model"] == str(out / "rg" / "request-1-three" / "model") and cfg["remain_excludes"] == "three"
    lineage = json.loads((second / "model" / "lineage.json").read_text())
    assert [e["concepts"] for e in lineage] == [["three"], ["red"]] and lineage[0]["from_model"] == "embedded:digits"
    assert json.loads((second / "results.json").read_text())["lineage"] == lineage
    assert "## Lineage" in (second / "model" / "README.md").read_text()
    prompts = [json.loads(x)["prompt"] if x.startswith("{") else x for x in
               json.loads((second / "data" / "remain" / "request.json").read_text())["prompts"]]
    assert prompts and not any("three" in p.split() for p in prompts)
    # --protect: request 2 is a two-concept run (both forget sets), from the protected request 1's model.
    protected = yaml.safe_load((out / "rg+protect" / "request-2-red" / "config.yaml").read_text())
    assert protected["concept"] == "three,red" and protected["remain_excludes"] == ""
    capsys.readouterr()
    assert cli.main(["demo", "--sequential", "three", "--out", str(tmp_path / "one"), "--quiet"]) == 2
    assert "two or more" in capsys.readouterr().err
