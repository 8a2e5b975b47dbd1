"""The ``fastkd distill`` command: overrides, and one-line errors (exit 2) for bad configs."""

import json
import os

import pytest

from engine_helpers import CONFIGS, fastkd, summary, tiny
from fastkd.engine.config import ConfigError, default_config, load_config


def _one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fastkd: error: ")
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


# --- in-process config checks (fast) -----------------------------------------------------------


def test_every_example_config_loads():
    paths = sorted(CONFIGS.glob("*.toml"))
    assert len(paths) >= 10
    methods = set()
    for p in paths:
        cfg = load_config(str(p))
        methods.add(cfg["method"])
    assert methods == {"distill", "self_distill", "mutual", "stagewise"}


def test_default_config_is_the_ensemble_experiment():
    cfg = default_config()
    assert cfg["method"] == "distill" and cfg["data"]["name"] == "digits"
    assert cfg["teacher"]["count"] > 1 and cfg["loss"][0]["kind"] == "kd"
    assert load_config(str(CONFIGS / "default.toml")) == cfg


def test_overrides_win_over_the_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[train]\nepochs = 7\nlr = 0.01\n")
    cfg = load_config(str(p), [("train.epochs", 3)])
    assert cfg["train"]["epochs"] == 3 and cfg["train"]["lr"] == 0.01


@pytest.mark.parametrize("text, fragment", [
    ("[train]\nepoch = 3\n", "unknown key 'train.epoch'"),
    ("[train]\nepochs = \"ten\"\n", "train.epochs must be an integer"),
    ("[train]\nbf16 = 1\n", "train.bf16 must be a boolean"),
    ("method = \"magic\"\n", "method must be one of"),
    ("[train]\nlr = -1.0\n", "train.lr must be >"),
    ("[[loss]]\nkind = \"kd\"\ntemperatur = 2.0\n", "unknown key 'loss[0].temperatur'"),
    ("[[loss]]\nkind = \"feature\"\n", "loss[0].student"),
    ("[[loss]]\nkind = \"nope\"\n", "loss[0].kind must be one of"),
    ("[[loss]]\nkind = \"kd\"\ndivergence = \"fkl\"\n", "loss[0].divergence must be one of 'kl', 'reverse_kl'"),
    ("[[loss]]\nkind = \"kd\"\nbeta = 0.5\n", "loss[0]: beta=0.5 was given but divergence='kl' takes no beta"),
    ("[[loss]]\nkind = \"kd\"\ndivergence = \"jsd\"\nbeta = 2.0\n", "beta must be in [0, 1] for divergence='jsd'"),
    ("train = 3\n", "train must be a table"),
    ("[train\n", "invalid TOML"),
])
def test_bad_config_raises_config_error(tmp_path, text, fragment):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert fragment in str(e.value)


# --- the command (subprocesses) -----------------------------------------------------------------


def test_unknown_key_exits_2_and_writes_nothing(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[teacher]\ncuont = 3\n")
    out = tmp_path / "run"
    proc = fastkd("distill", cfg, "--out", out)
    _one_line_error(proc, "unknown key 'teacher.cuont'", "count")
    assert not out.exists()


def test_wrong_type_flag_and_missing_file(tmp_path, capsys):
    # In-process through cli.main (the subprocess tests above and below cover the exit path).
    from fastkd.cli import main

    def err(*argv):
        assert main([str(a) for a in argv]) == 2
        text = capsys.readouterr().err.strip()
        assert "\n" not in text and text.startswith("fastkd: error: ") and "Traceback" not in text
        return text

    assert "many" in err("distill", "--epochs", "many", "--out", tmp_path / "r")
    assert "config file not found" in err("distill", tmp_path / "nope.toml")
    assert "dataset file not found" in err("distill", "--data", tmp_path / "missing.npz", "--out", tmp_path / "r")
    assert "train.batch_size must be >= 1" in err("distill", "--set", "train.batch_size=0", "--out", tmp_path / "r")
    assert "unrecognized arguments" in err("distill", "--bogus")
    assert not (tmp_path / "r").exists()


def test_missing_module_path(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[loss]]\nkind = "feature"\nstudent = "blocks.7"\nteacher = "stem"\n')
    proc = fastkd("distill", cfg, "--out", tmp_path / "r")
    _one_line_error(proc, "loss[0].student", "'blocks.7' does not exist in the student model")
    assert not (tmp_path / "r").exists()


def test_run_then_refuse_a_different_run_in_the_same_directory(tmp_path):
    out = tmp_path / "run"
    proc = fastkd("distill", "--out", out, "--epochs", "2", "--seed", "1", *tiny())
    assert proc.returncode == 0, proc.stderr
    assert "student_kd" in proc.stdout and "agreement" in proc.stdout  # the final table
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    s = summary(out)
    assert s["seed"] == 1 and len([l for l in (out / "metrics.jsonl").read_text().splitlines()]) > 0

    proc = fastkd("distill", "--out", out, "--epochs", "3", "--seed", "1", *tiny())
    _one_line_error(proc, "holds a different run", "train.epochs")
    proc = fastkd("distill", "--out", out, "--epochs", "2", "--seed", "1", *tiny())
    _one_line_error(proc, "already holds this run", "--resume")
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert before == after  # nothing overwritten

    stranger = tmp_path / "other"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    _one_line_error(fastkd("distill", "--out", stranger, *tiny()), "not empty")
    _one_line_error(fastkd("distill", "--resume", tmp_path / "none"), "holds no run")


def test_resume_of_a_finished_run_reuses_its_config(tmp_path):
    out = tmp_path / "run"
    assert fastkd("distill", "--out", out, "--epochs", "1", *tiny()).returncode == 0
    first = summary(out)["models"]
    proc = fastkd("distill", "--resume", out)
    assert proc.returncode == 0, proc.stderr
    assert summary(out)["models"] == first
    assert json.loads((out / "config.json").read_text())["config"]["train"]["epochs"] == 1


def test_ctrl_c_says_how_to_resume(tmp_path):
    import signal
    import subprocess
    import sys

    from engine_helpers import env
    from proc_helpers import paused_at_checkpoint

    out = tmp_path / "run"
    args = [sys.executable, "-m", "fastkd", "distill", "--out", str(out), *tiny(**{"train.checkpoint_every": "5"})]
    # A child of a non-interactive shell may inherit SIGINT ignored: restore the default. The run
    # waits after its first checkpoint until interrupted: it cannot finish first.
    proc = paused_at_checkpoint(args[3:], out, lambda state: True, env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"fastkd: interrupted; continue from its last checkpoint with: fastkd distill --resume {out}" in err
    assert "Traceback" not in err
    resumed = fastkd("distill", "--resume", out)
    assert resumed.returncode == 0, resumed.stderr
    assert "student_kd" in summary(out)["models"]
