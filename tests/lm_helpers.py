"""The language-model tests' tiny job: a made-up corpus and the overrides that shrink
configs/lm.toml to seconds (tests/test_engine_lm.py, tests/test_cache_teacher.py)."""

import json
import random
import subprocess
import sys

import pytest

from engine_helpers import CONFIGS, env, one_line_error  # noqa: F401 - one_line_error: for the LM tests

WORDS = ("the teacher model writes a token then the student reads every window and learns which word "
         "comes next from soft targets while the baseline sees only labels of text data").split()


def write_corpus(folder, documents=9, words=45, seed=0):
    """Nine short documents of pseudo-English from a fixed word list (a few hundred tokens)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(documents):
        text = " ".join(rng.choice(WORDS) for _ in range(words))
        (folder / f"doc{d}.txt").write_text(text + ".\n")
    return folder


def tiny(corpus, **extra) -> dict:
    """Overrides that shrink configs/lm.toml to seconds: the corpus above, a 300-entry BPE,
    windows of 16 tokens, 2-layer models (teacher 32 wide, student 16) at a learning rate
    tiny models take."""
    o = {"data.path": str(corpus), "data.vocab_size": 300, "data.context": 16,
         "teacher.n_layer": 2, "teacher.n_embd": 32, "teacher.n_head": 2, "teacher.epochs": 3,
         "student.n_layer": 2, "student.n_embd": 16, "student.n_head": 2,
         "train.batch_size": 4, "train.epochs": 3, "train.warmup_steps": 2, "train.lr": 0.003, "train.threads": 1,
         "train.measure_memory": False, "train.checkpoint_every": 4, "train.eval_every": 0}
    o.update(extra)
    return o


def as_kwargs(overrides: dict) -> dict:
    return {k.replace(".", "__"): v for k, v in overrides.items()}


def as_args(overrides: dict) -> list:
    out = []
    for k, v in overrides.items():
        value = json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)
        out += ["--set", f"{k}={value}"]
    return out


@pytest.fixture()
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTKD_CACHE", str(tmp_path / "cache"))
    return write_corpus(tmp_path / "corpus")


def lm_env(tmp_path) -> dict:
    e = env()
    e["FASTKD_CACHE"] = str(tmp_path / "cache")
    return e


def torchrun(tmp_path, out, *extra):
    """``fastkd distill configs/lm.toml`` on 2 gloo CPU ranks (torchrun, one machine)."""
    e = lm_env(tmp_path)
    e.update({"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastkd", "distill", str(CONFIGS / "lm.toml"), "--out", str(out), "--no-progress",
           "--set", "train.plot=false", *extra]
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=300)
