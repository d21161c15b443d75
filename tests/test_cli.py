"""The command line: user errors are one sentence, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from diffunlearn.cli import main


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffunlearn.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                               "OMP_NUM_THREADS": "1"})  # one thread: two would spin beside the other test worker


USER_ERRORS = [
    (["demo", "--concept", "dragon"], "unknown concept 'dragon'"),
    (["demo", "--methods", "ga,magic"], "unknown method 'magic'"),
    (["unlearn", "method=magic"], "unknown method 'magic'"),
    (["unlearn", "steps=0", "lr=fast"], "`lr` must be a number"),
    (["unlearn", "missing.yaml"], "config file missing.yaml does not exist"),
    (["unlearn", "model=/nonexistent/model"], "model folder /nonexistent/model does not exist"),
    (["world", "check", "/nonexistent/model"], "does not exist"),
]


@pytest.mark.parametrize("args, fragment", [USER_ERRORS[5]])
def test_user_errors_exit_2_without_traceback_in_a_real_process(tmp_path, args, fragment):
    """The exit status and the one-line stderr of the installed command itself, for a model error (it
    passes the config check and reaches the loader); every user error, this one too, is checked
    in-process below, where starting Python for each would cost seconds."""
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert fragment in proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("args, fragment", USER_ERRORS)
def test_user_errors_exit_2_with_one_line_and_write_nothing(tmp_path, monkeypatch, capsys, args, fragment):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and fragment in err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_malformed_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\nlr: 0.1\n")
    assert main(["unlearn", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    assert main(["unlearn", str(listy), "--out", str(tmp_path / "run")]) == 2
    assert "must be a mapping" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_every_config_problem_is_reported_at_once(capsys):
    assert main(["unlearn", "steps=-1", "batch_size=0", "forget_cap=soft", "colour=red"]) == 2
    err = capsys.readouterr().err
    for fragment in ("`steps` must be a positive integer", "`batch_size` must be a positive integer",
                     "`forget_cap` must be one of", "unknown key `colour`"):
        assert fragment in err


def test_corrupt_model_folder(tmp_path, capsys):
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "scheduler").mkdir()
    (folder / "model_index.json").write_text('{"_diffunlearn_adapter": "pixel"}')
    (folder / "unet" / "config.json").write_text("{not json")
    assert main(["world", "check", str(folder), "--n", "2", "--quiet"]) == 2
    assert "could not load the model" in capsys.readouterr().err
    (folder / "model_index.json").write_text("{oops")
    assert main(["world", "check", str(folder), "--n", "2", "--quiet"]) == 2
    assert "corrupt" in capsys.readouterr().err
