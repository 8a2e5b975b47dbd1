"""The language-model task end to end on a tiny corpus (a few hundred tokens, 2-layer GPT-2
models, tens of steps): summary schema, resume after SIGKILL, the fused head against the
materialised logits, 2-rank DDP (and FSDP2), and the inputs that must stop with one line."""

import json
import math
import signal
import subprocess
import sys

import pytest
import torch

from engine_helpers import CONFIGS, one_line_error, run_cli, run_config, summary
from lm_helpers import as_args, as_kwargs, corpus, lm_env, tiny, torchrun  # noqa: F401 - corpus is a fixture
from proc_helpers import in_students_phase, paused_at_checkpoint
from fastkd.engine import checkpoint as ckpt

def test_tiny_lm_job_writes_the_summary_schema(tmp_path, corpus):
    out = tmp_path / "run"
    s = run_config(CONFIGS / "lm.toml", out, train__plot=True, **as_kwargs(tiny(corpus, **{"train.measure_memory": True})))
    assert s["task"] == "lm" and s["method"] == "distill"
    models = s["models"]
    assert set(models) == {"teacher", "student_baseline", "student_kd"}
    for name, m in models.items():
        assert m["perplexity"] == pytest.approx(math.exp(m["nll"]), rel=1e-9)
        assert 0.0 <= m["accuracy"] <= 1.0
        # Far below a uniform guess over the vocabulary after tens of steps.
        assert m["nll"] < math.log(s["data"]["vocab_size"]) - 0.5, name
    for name in ("student_baseline", "student_kd"):
        assert 0.0 <= models[name]["agreement"] <= 1.0 and models[name]["predictive_kl"] >= 0.0
        assert models[name]["reference"] == "teacher_0"
    assert "agreement" not in models["teacher"]
    d = s["data"]
    assert d["name"] == "lm" and d["vocab_size"] == 300 and d["context"] == 16
    assert sum(d["documents"].values()) == 9 and min(d["documents"].values()) >= 1
    assert d["tokens"]["train"] > 200
    for name in ("teacher", "student_baseline", "student_kd"):
        assert s["training"][name]["tokens_per_s"] > 0 and s["training"][name]["step_peak_mb"] > 0
    assert json.loads((out / "summary.json").read_text())["models"] == models
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    val = [l for l in lines if l["split"] == "val"]
    assert len(val) == 3 * 3 and all("perplexity" in l for l in val)
    assert all("kd0" in l["terms"] for l in val if l["model"] == "student_kd")
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for f in ("models/teacher_0.safetensors", "models/student_kd.safetensors", "checkpoint.pt", "config.json"):
        assert (out / f).is_file(), f


def test_fused_head_equals_the_materialised_logits_on_a_batch(tmp_path, corpus):
    """The KD term on one batch of the tiny job: through the fused output layer
    (fused_linear_kd_loss on the hidden states entering lm_head) and through materialised
    logits (kd_loss), with the label shift and a padded, ignored tail: the same loss and the
    same gradients."""
    from fastkd.engine.config import load_config
    from fastkd.engine.losses import KDTerm, StepOutputs, TeacherOutputs
    from fastkd.engine.tasks import make_task

    overrides = tiny(corpus)
    cfg = load_config(str(CONFIGS / "lm.toml"), list(overrides.items()))
    task = make_task(cfg).to(torch.device("cpu"))
    splits = task.load()
    teacher, student = task.build("teacher", 1), task.build("student", 2)
    teacher.eval()
    # The test split's last window ends in padding labelled -100: it must count nowhere.
    x, y = splits.test.x[-3:], splits.test.y[-3:]
    assert (y == -100).any() and (y != -100).any()
    with torch.no_grad():
        tv = task.view(teacher, task.forward(teacher, x), y)
    for hard_weight in (0.0, 0.3):
        results = []
        # The fused head in one chunk and in chunks of 7 rows (the last one short), then logits.
        for fused, chunk in ((True, 0), (True, 7), (False, 0)):
            student.zero_grad()
            view = task.view(student, task.forward(student, x), y)
            term = KDTerm.build(dict(cfg["loss"][0], fused_head=fused, hard_weight=hard_weight, chunk_size=chunk), 0)
            loss = term(StepOutputs(None, {}, view.labels, TeacherOutputs(None, [{}], hidden=[tv.hidden], heads=[tv.head]),
                                    torch.nn.ModuleDict(), hidden=view.hidden, head=view.head, masked=True))
            loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}))
        l_mat, g_mat = results[-1]
        for l_fused, g_fused in results[:-1]:
            torch.testing.assert_close(l_fused, l_mat, rtol=1e-5, atol=1e-6)
            for name in g_mat:
                torch.testing.assert_close(g_fused[name], g_mat[name], rtol=1e-4, atol=1e-6, msg=name)
        # The padded rows are left out: the loss equals the one over the valid rows alone.
        keep = view.labels != -100
        valid = KDTerm.build(dict(cfg["loss"][0], fused_head=False, hard_weight=hard_weight), 0)(StepOutputs(
            view.head(view.hidden)[keep].detach(), {}, view.labels[keep], TeacherOutputs([tv.head(tv.hidden)[keep]]),
            torch.nn.ModuleDict()))
        torch.testing.assert_close(l_fused, valid, rtol=1e-5, atol=1e-6)


def _cli(tmp_path, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fastkd", "distill", str(CONFIGS / "lm.toml"), *map(str, args)],
                          env=lm_env(tmp_path), capture_output=True, text=True, timeout=timeout)


def test_lm_resume_after_sigkill_reaches_the_same_summary(tmp_path, corpus):
    o = tiny(corpus, **{"train.epochs": 6, "train.checkpoint_every": 3})
    reference = tmp_path / "reference"
    done = _cli(tmp_path, "--out", reference, "--no-progress", "--set", "train.plot=false", *as_args(o))
    assert done.returncode == 0, done.stderr

    out = tmp_path / "killed"
    # Kill -9 at a checkpoint taken inside the students' phase (the run waits there for it).
    proc = paused_at_checkpoint(["distill", CONFIGS / "lm.toml", "--out", out, "--no-progress", "--set", "train.plot=false", *as_args(o)],
                                out, in_students_phase, lm_env(tmp_path))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "summary.json").exists()

    resumed = subprocess.run([sys.executable, "-m", "fastkd", "distill", "--resume", str(out)], env=lm_env(tmp_path),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert summary(out)["models"] == summary(reference)["models"]
    lines = lambda p: (p / "metrics.jsonl").read_text().splitlines()
    assert lines(out) == lines(reference)


def test_lm_two_cpu_ranks_ddp(tmp_path, corpus):
    """torchrun with 2 gloo ranks: each rank trains on its own windows of every batch, the
    metrics are reduced across ranks, only rank 0 writes."""
    out = tmp_path / "run"
    proc = torchrun(tmp_path, out, *as_args(tiny(corpus)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = summary(out)
    alone = run_config(CONFIGS / "lm.toml", tmp_path / "alone", **as_kwargs(tiny(corpus)))
    assert s["data"] == alone["data"]
    # The ranks' halves of a batch are the single process's batch (shard takes every other
    # window of the epoch's order), except that the ranks drop an odd last window: the same
    # models up to rounding and that window.
    for name in ("teacher", "student_baseline", "student_kd"):
        assert s["models"][name]["nll"] < math.log(300) - 0.5
        assert abs(s["models"][name]["nll"] - alone["models"][name]["nll"]) < 0.02, name
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([l for l in lines if l["split"] == "val"]) == 3 * 3
    assert proc.stdout.count("student_kd") == 1
    # Each rank takes half of every 4-window batch: ceil((windows / 2) / 2) steps an epoch.
    first = next(l for l in lines if l["split"] == "val")
    assert first["step"] == -(-(s["data"]["windows"]["train"] // 2) // 2)


def test_lm_two_cpu_ranks_fsdp2_matches_ddp(tmp_path, corpus):
    """train.shard = true: FSDP2 (fully_shard per transformer block, then the model) on the
    same 2 gloo ranks trains the same models as DDP, to rounding."""
    runs = {}
    for shard in (False, True):
        out = tmp_path / f"shard-{shard}"
        proc = torchrun(tmp_path, out, *as_args(tiny(corpus, **{"train.shard": shard, "train.epochs": 2})))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[shard] = summary(out)["models"]
    for name, m in runs[False].items():
        for key in ("nll", "accuracy", "agreement", "predictive_kl"):
            if key in m:
                assert runs[True][name][key] == pytest.approx(m[key], rel=1e-4, abs=1e-6), (name, key)


def test_missing_data_path_stops_with_one_line(tmp_path):
    line = one_line_error(_cli(tmp_path, "--out", tmp_path / "run", "--set", f"data.path={json.dumps(str(tmp_path / 'nope'))}"))
    assert "data.path" in line and "does not exist" in line


def test_tokenizer_and_model_vocabularies_must_match(tmp_path, corpus):
    from tokenizers import Tokenizer

    from fastkd.engine.models import _offline_transformers

    tf = _offline_transformers()
    # A saved tokenizer of 300 entries, and a from_pretrained directory whose model has 512.
    run_config(CONFIGS / "lm.toml", tmp_path / "first", **as_kwargs(tiny(corpus, **{"train.epochs": 1})))
    tok_file = next((tmp_path / "cache").rglob("tokenizer.json"))
    assert Tokenizer.from_file(str(tok_file)).get_vocab_size() == 300
    model_dir = tmp_path / "gpt2-512"
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=512, n_positions=32, n_embd=16, n_layer=1, n_head=2)).save_pretrained(model_dir)
    o = tiny(corpus, **{"data.tokenizer": str(tok_file), "teacher.path": str(model_dir)})
    line = one_line_error(_cli(tmp_path, "--out", tmp_path / "run", *as_args(o)))
    assert "teacher" in line and "512" in line and "300" in line
    # The same directory with a matching vocabulary loads and trains.
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=2)).save_pretrained(model_dir)
    s = run_config(CONFIGS / "lm.toml", tmp_path / "pretrained", **as_kwargs(dict(o, **{"train.epochs": 1})))
    assert s["models"]["teacher"]["nll"] > 0


def test_context_longer_than_the_model_stops_with_one_line(tmp_path, corpus):
    line = one_line_error(_cli(tmp_path, "--out", tmp_path / "run", *as_args(tiny(corpus, **{"student.n_positions": 8}))))
    assert "data.context=16" in line and "8 tokens" in line


def test_a_diverging_lm_job_stops_and_a_non_finite_model_measures_nan(tmp_path, corpus, capsys):
    """The language-model task has the digits job's guard: at train.lr = 1e30 the first step
    (the initial weights) is finite and its update overflows every later forward, so step 2 is
    the first bad one; and the evaluation of a model whose output is NaN is NaN throughout,
    never an agreement with its teacher."""
    from fastkd.engine.config import load_config
    from fastkd.engine.tasks import Member, make_task

    out = tmp_path / "run"
    proc = run_cli(capsys, "distill", CONFIGS / "lm.toml", "--out", out, *as_args(tiny(corpus, **{"train.lr": 1e30})))
    line = one_line_error(proc, 3)
    assert "teacher_0 diverged in phase 'teachers': its training loss was not finite at optimizer step 2;" in line
    assert "train.lr = 1e+30 is likely too high" in line and not (out / "summary.json").exists()

    cfg = load_config(str(CONFIGS / "lm.toml"), list(tiny(corpus).items()))
    task = make_task(cfg).to(torch.device("cpu"))
    splits = task.load()
    good, bad = task.build("teacher", 1), task.build("student", 2)
    with torch.no_grad():
        bad.transformer.wte.weight.fill_(math.nan)
    m = task.evaluate(splits.test, [Member("bad", lambda: bad)], [Member("good", lambda: good)], {})
    assert all(math.isnan(m[k]) for k in ("nll", "perplexity", "accuracy", "agreement", "predictive_kl")), m
    m = task.evaluate(splits.test, [Member("good", lambda: good)], [Member("bad", lambda: bad)], {})
    assert math.isfinite(m["nll"]) and 0 <= m["accuracy"] <= 1, m
    assert math.isnan(m["agreement"]) and math.isnan(m["predictive_kl"]), m


def test_lm_config_errors():
    from fastkd.engine.config import ConfigError, load_config

    lm = str(CONFIGS / "lm.toml")
    with pytest.raises(ConfigError, match="student.arch must be 'gpt2'"):
        load_config(lm, [("student.arch", "mlp")])
    with pytest.raises(ConfigError, match="teacher.arch 'gpt2' is a language model"):
        load_config(None, [("teacher.arch", "gpt2")])
    with pytest.raises(ConfigError, match="method 'mutual' is not available for the lm task"):
        load_config(lm, [("method", "mutual")])
    import tomllib

    with open(lm, "rb") as f:
        base = tomllib.load(f)
    base["loss"] = [{"kind": "feature", "student": "transformer.h.0", "teacher": "transformer.h.0"}]
    with pytest.raises(ConfigError, match=r"loss\[0\].kind 'feature' is not available for the lm task"):
        load_config(None, base=base)
    with pytest.raises(ConfigError, match="teacher.count must be 1"):
        load_config(lm, [("teacher.count", 2)])
    cfg = load_config(lm, [("loss.0.fused_head", False)])
    assert cfg["loss"][0]["fused_head"] is False and load_config(lm)["loss"][0]["fused_head"] is True


def test_data_lm_runs_the_lm_config():
    """`fastkd distill --data lm` with no file is configs/lm.toml (embedded in the package)."""
    from fastkd.cli import build_parser, config_from_args
    from fastkd.engine.config import load_config

    cfg, resume = config_from_args(build_parser().parse_args(["distill", "--data", "lm"]))
    assert not resume and cfg == load_config(str(CONFIGS / "lm.toml"))
    cfg, _ = config_from_args(build_parser().parse_args(["distill", "--data", "lm", "--set", "loss.0.fused_head=false"]))
    assert cfg["loss"][0]["fused_head"] is False and cfg["teacher"]["arch"] == "gpt2"


@pytest.mark.slow
def test_lm_job_claim(tmp_path):
    """The issue's claim from one run of configs/lm.toml as shipped (the embedded corpus):
    the KD student agrees with the teacher more and has a lower predictive KL than the
    baseline, with a perplexity no worse. Every core trains (the config's one thread suits a
    machine shared with other work; a test suite's process has the machine to itself), which
    changes no result beyond float rounding."""
    m = run_config(CONFIGS / "lm.toml", tmp_path / "lm", train__threads=0)["models"]
    kd, base = m["student_kd"], m["student_baseline"]
    assert kd["agreement"] > base["agreement"]
    assert kd["predictive_kl"] < base["predictive_kl"]
    assert kd["perplexity"] <= base["perplexity"]
