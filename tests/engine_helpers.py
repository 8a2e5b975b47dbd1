"""Shared helpers for the engine, CLI and data tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def env() -> dict:
    """Environment for a subprocess: the repository importable, one thread, no progress noise."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def fastkd(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """Run ``python -m fastkd ARGS`` and capture its output."""
    return subprocess.run([sys.executable, "-m", "fastkd", *map(str, args)], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def tiny(**extra) -> list:
    """``--set`` overrides that make a job take seconds (few, small teachers; no plot/progress)."""
    sets = {"train.progress": "false", "train.plot": "false", "teacher.count": "2", **extra}
    out = []
    for k, v in sets.items():
        out += ["--set", f"{k}={v}"]
    return out


def summary(run_dir) -> dict:
    with open(Path(run_dir) / "summary.json") as f:
        return json.load(f)


def run_config(path, out, **overrides):
    """Run a config in this process; returns the summary. ``overrides``: dotted key -> value
    (use ``__`` for dots in keyword names, e.g. ``train__epochs=3``)."""
    from fastkd.engine.config import load_config
    from fastkd.engine.runner import run_job

    ov = [("out", str(out)), ("train.progress", False), ("train.plot", False)]
    ov += [(k.replace("__", "."), v) for k, v in overrides.items()]
    cfg = load_config(None if path is None else str(path), ov)
    return run_job(cfg, quiet=True)


def one_line_error(proc, code: int = 2) -> str:
    """The single ``fastkd: error:`` line of a command that stopped with exit status ``code``
    (2: a refused input; 3: a diverged training). Lines before it (a resumed run says where it
    resumes from) are allowed; a traceback is not."""
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    errors = [l for l in lines if l.startswith("fastkd: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    if code == 2:
        assert len(lines) == 1, proc.stderr
    return errors[0]


def run_cli(capsys, *argv) -> subprocess.CompletedProcess:
    """``fastkd ARGV`` in this process (no interpreter start-up): its exit status and output."""
    from fastkd.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(argv), rc, out.out, out.err)


class _Crafted:
    """Pickles as a call of ``open(marker, "w")``: a file that creates ``marker`` when
    unpickled, as a model file from someone else could run any code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted_pickle(path, marker) -> None:
    """A ``.pt`` (torch.save's zip format) whose unpickling would create ``marker``."""
    import torch

    torch.save({"role": "teacher", "state": {"weight": _Crafted(marker)}}, str(path))
