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
