"""`fastkd cache-teacher` and `fastkd distill --teacher-cache` on the tiny language-model job.

A cache written once (its teacher trained in a run directory of its own, before the first shard)
and distilled from; a full-width cache distils exactly like the online teacher; a damaged shard
or a cache made for another job stops distill with one line before training; a cache-teacher
killed with SIGKILL resumes without touching finished shards or retraining its teacher; the
inputs cache-teacher refuses; students measured against the cache when the teacher is gone."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from engine_helpers import CONFIGS, ROOT, crafted_pickle, one_line_error, run_cli, summary
from lm_helpers import as_args, lm_env, tiny, torchrun, write_corpus
from fastkd import teacher_cache as tc


def _run(tmp_path, command, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fastkd", command, str(CONFIGS / "lm.toml"), *map(str, args)],
                          env=lm_env(tmp_path), capture_output=True, text=True, timeout=timeout)


def _sets(tmp_path, **extra):
    return [*as_args(tiny(tmp_path / "corpus", **extra)), "--no-progress", "--set", "train.plot=false"]


@pytest.fixture()
def refused(monkeypatch, capsys):
    """``refused(root, command, *args)``: the one-line error of a fastkd command that must stop
    before doing anything, run in this process (no interpreter start-up per case)."""
    from fastkd.cli import main

    def call(root, command, *args):
        monkeypatch.setenv("FASTKD_CACHE", str(root / "cache"))
        capsys.readouterr()
        rc = main([command, str(CONFIGS / "lm.toml"), *map(str, args)])
        out = capsys.readouterr()
        return one_line_error(subprocess.CompletedProcess([], rc, out.out, out.err))

    return call


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The tiny job's corpus and a top-8 cache of its teacher (in shards of 300 tokens)."""
    root = tmp_path_factory.mktemp("cache-teacher")
    write_corpus(root / "corpus")
    proc = _run(root, "cache-teacher", "--top-k", 8, "--out", root / "top8", "--shard-tokens", 300, *_sets(root))
    assert proc.returncode == 0, proc.stderr
    return root


def _copy(written, tmp_path):
    """The fixture's cache and teacher in this test's own folder (the manifest names the teacher
    by its absolute path: rewritten to the copy's)."""
    shutil.copytree(written / "top8", tmp_path / "top8")
    shutil.copytree(written / "top8-teacher", tmp_path / "top8-teacher")
    shutil.copytree(written / "corpus", tmp_path / "corpus")
    if (written / "cache").exists():
        shutil.copytree(written / "cache", tmp_path / "cache")
    return tmp_path / "top8"


def test_cache_then_distill_from_it(written, tmp_path):
    cache_dir = written / "top8"
    files = sorted(p.name for p in cache_dir.iterdir())
    assert files == ["manifest.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["complete"] and manifest["spec"]["top_k"] == 8 and manifest["spec"]["selection"] == "top_k"
    assert set(manifest["spec"]["fingerprints"]) == {"vocabulary", "data", "teacher"}
    teacher = manifest["info"]["teacher"]
    assert teacher["run"] == str(written / "top8-teacher") and teacher["dir"] == str(written / "top8-teacher" / "teacher")
    # The teacher was saved before the first shard was written.
    saved = os.stat(os.path.join(teacher["dir"], "config.json")).st_mtime_ns
    assert saved <= (cache_dir / "shard-00000.safetensors").stat().st_mtime_ns
    assert (written / "top8-teacher" / "summary.json").is_file()

    out = tmp_path / "run"
    proc = _run(written, "distill", "--teacher-cache", cache_dir, "--out", out, *_sets(written))
    assert proc.returncode == 0, proc.stderr
    s = summary(out)
    c = s["teacher_cache"]
    # 56 windows of 16 tokens: 15 rows each (the last position predicts nothing).
    assert s["data"]["windows"]["train"] == 56 and manifest["spec"]["tokens"] == 56 * 15
    assert (c["tokens"], c["top_k"], c["values"], c["selection"]) == (840, 8, "logprobs", "top_k")
    assert c["bytes"] == sum(p.stat().st_size for p in cache_dir.iterdir())
    assert c["bytes_per_token"] == pytest.approx(c["bytes"] / 840, abs=1e-3)
    assert set(s["models"]) == {"teacher", "student_baseline", "student_kd"}
    for name in ("student_baseline", "student_kd"):
        assert s["models"][name]["reference"] == "teacher_0" and 0 <= s["models"][name]["agreement"] <= 1
    # No teacher was trained here: its phase is gone, and its weights stay where they were.
    assert set(s["phase_wall_s"]) == {"students"}
    assert sorted(p.name for p in (out / "models").iterdir()) == ["student_baseline.safetensors", "student_kd.safetensors"]


def test_a_fused_head_from_a_cache_distils_as_the_materialised_path(written, tmp_path):
    """fused_head = true reads the cache with fastkd.fused_linear_sparse_kd_loss: the same
    student to rounding as sparse_kd_loss on materialised logits, at a lower step peak (chunks of
    8 rows of the 300-entry vocabulary instead of the batch's [60, 300] logits and gradient)."""
    runs = {}
    for fused in (True, False):
        out = tmp_path / f"fused-{fused}"
        extra = {"loss.0.fused_head": fused, "loss.0.chunk_size": 8, "train.measure_memory": True, "train.epochs": 1}
        proc = _run(written, "distill", "--teacher-cache", written / "top8", "--out", out, *_sets(written, **extra))
        assert proc.returncode == 0, proc.stderr
        runs[fused] = summary(out)
    fused, dense = runs[True], runs[False]
    for key in ("nll", "agreement", "predictive_kl"):
        assert fused["models"]["student_kd"][key] == pytest.approx(dense["models"]["student_kd"][key], rel=1e-4, abs=1e-5), key
    peak = {k: r["training"]["student_kd"]["step_peak_mb"] for k, r in runs.items()}
    assert peak[True] < peak[False], peak


def test_a_full_width_cache_distils_like_the_online_teacher(tmp_path):
    """K = V: the cached teacher is the whole (bf16-rounded) distribution, so the student
    distilled from it follows the online run's to rounding, on the same batches; the teacher
    (trained by cache-teacher as distill trains it) and the baseline are the online run's."""
    write_corpus(tmp_path / "corpus")
    online = tmp_path / "online"
    assert _run(tmp_path, "distill", "--out", online, *_sets(tmp_path)).returncode == 0
    proc = _run(tmp_path, "cache-teacher", "--top-k", 300, "--out", tmp_path / "full", *_sets(tmp_path))
    assert proc.returncode == 0, proc.stderr
    cached = tmp_path / "cached"
    proc = _run(tmp_path, "distill", "--teacher-cache", tmp_path / "full", "--out", cached, *_sets(tmp_path))
    assert proc.returncode == 0, proc.stderr
    a, b = summary(online)["models"], summary(cached)["models"]
    assert b["teacher"] == a["teacher"] and b["student_baseline"] == a["student_baseline"]
    for key in ("nll", "agreement", "predictive_kl"):
        assert b["student_kd"][key] == pytest.approx(a["student_kd"][key], rel=2e-3, abs=2e-3), key
    # ... and a top-8 cache of the same teacher does not (the check can tell them apart). That
    # cache takes the online run's own teacher file: its weights are those cache-teacher trained.
    teacher_file = online / "models" / "teacher_0.safetensors"
    proc = _run(tmp_path, "cache-teacher", "--top-k", 8, "--out", tmp_path / "top8",
                *_sets(tmp_path, **{"teacher.path": str(teacher_file)}))
    assert proc.returncode == 0, proc.stderr
    top8 = tc.TeacherCache(tmp_path / "top8")
    assert top8.info["teacher"] == {"checkpoint": str(teacher_file), "dir": str(tmp_path / "top8-teacher" / "teacher")}
    assert top8.fingerprints["teacher"] == tc.TeacherCache(tmp_path / "full").fingerprints["teacher"]
    assert _run(tmp_path, "distill", "--teacher-cache", tmp_path / "top8", "--out", tmp_path / "k8", *_sets(tmp_path)).returncode == 0
    assert summary(tmp_path / "k8")["models"]["student_kd"]["nll"] != pytest.approx(a["student_kd"]["nll"], rel=2e-3)


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_damaged_shard_stops_distill_before_training(written, tmp_path, how, refused):
    cache_dir = _copy(written, tmp_path)
    shard = cache_dir / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x04
    else:
        del data[-64:]
    shard.write_bytes(bytes(data))
    out = tmp_path / "run"
    line = refused(tmp_path, "distill", "--teacher-cache", cache_dir, "--out", out, *_sets(tmp_path))
    assert str(shard) in line and ("corrupted" if how == "flip" else "truncated") in line
    assert not out.exists()


def test_a_cache_for_another_job_is_refused_with_what_differs(written, tmp_path, refused):
    cache_dir = written / "top8"
    # Another tokenizer (a BPE of 280 entries), hence other token windows.
    line = refused(written, "distill", "--teacher-cache", cache_dir, "--out", tmp_path / "a",
                   *_sets(written, **{"data.vocab_size": 280}))
    assert "does not match this job" in line and "vocabulary fingerprint" in line and "vocabulary size 300 (this job: 280)" in line
    line = refused(written, "distill", "--teacher-cache", cache_dir, "--out", tmp_path / "b",
                   *_sets(written, **{"teacher.cache_top_k": 16}))
    assert "top-k 8 (this job: 16)" in line and "vocabulary" not in line
    line = refused(written, "distill", "--teacher-cache", cache_dir, "--out", tmp_path / "c",
                   *_sets(written, **{"data.context": 20}))
    assert "data fingerprint" in line and "tokens 840" in line
    assert not any((tmp_path / d).exists() for d in "abc")


_SLOW_WRITER = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [sys.argv[1]]
    from fastkd import teacher_cache as tc
    from fastkd.cli import main
    flush = tc.CacheWriter._flush
    def slow(self, rows):  # a teacher as slow as a real one: time to be killed between shards
        flush(self, rows)
        time.sleep(0.3)
    tc.CacheWriter._flush = slow
    sys.exit(main(sys.argv[2:]))
""")


def test_sigkill_while_caching_then_resume(written, tmp_path):
    """Killed between shards, then --resume: the finished shards are not rewritten (mtime and
    hash), the teacher is not trained again, and the cache equals one written in one go."""
    args = ["cache-teacher", str(CONFIGS / "lm.toml"), "--top-k", "8", "--out", str(tmp_path / "c"), "--teacher-out",
            str(written / "top8-teacher"), "--shard-tokens", "100", *_sets(written)]
    teacher_files = {p: p.stat().st_mtime_ns for p in (written / "top8-teacher").rglob("*") if p.is_file()}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(ROOT), *args], env=lm_env(written),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                if len(json.loads((tmp_path / "c" / "manifest.json").read_text())["shards"]) >= 3:
                    break
            except (OSError, ValueError):
                pass
            assert proc.poll() is None, "cache-teacher ended before it could be killed: " + proc.stderr.read().decode()
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    listed = json.loads((tmp_path / "c" / "manifest.json").read_text())["shards"]
    assert 3 <= len(listed) < 9
    before = {e["file"]: ((tmp_path / "c" / e["file"]).stat().st_mtime_ns, e["hash"]) for e in listed}

    again = subprocess.run([sys.executable, "-m", "fastkd", *args], env=lm_env(written), capture_output=True, text=True)
    assert "pass --resume" in one_line_error(again)
    resumed = subprocess.run([sys.executable, "-m", "fastkd", *args, "--resume"], env=lm_env(written),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    for name, (mtime, digest) in before.items():
        p = tmp_path / "c" / name
        assert (p.stat().st_mtime_ns, tc.file_hash(p)) == (mtime, digest), f"{name} was rewritten"
    assert {p: p.stat().st_mtime_ns for p in teacher_files} == teacher_files, "the teacher was trained or saved again"
    # The same cache as one written in one go.
    ref = tc.TeacherCache(written / "top8")
    done = tc.TeacherCache(tmp_path / "c")
    assert done.tokens == ref.tokens == 840 and len(done.shards) == 9
    for start in (0, 420):
        a, b = done.rows(start, start + 420), ref.rows(start, start + 420)
        assert a[0].equal(b[0]) and a[1].equal(b[1])


def test_cache_teacher_refuses_before_training(written, tmp_path, refused):
    """Bad inputs stop with one line, before a teacher is trained (no run directory appears)."""
    cases = [
        ((), "--top-k K or --sample K"),
        (("--top-k", "0"), "--top-k must be at least 1"),
        (("--top-k", "301"), "larger than the vocabulary (300)"),
        (("--sample", "4", "--values", "logits"), "--values logits does not apply"),
        (("--top-k", "4", "--shard-tokens", "0"), "--shard-tokens must be at least 1"),
    ]
    for i, (extra, expect) in enumerate(cases):
        out = tmp_path / f"c{i}"
        line = refused(written, "cache-teacher", *extra, "--out", out, *_sets(written))
        assert expect in line, line
        assert not out.exists() and not (tmp_path / f"c{i}-teacher").exists()
    # A teacher.path file that is not a model file, or not weights of the job's teacher.
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    line = refused(written, "cache-teacher", "--top-k", 4, "--out", tmp_path / "d",
                   *_sets(written, **{"teacher.path": str(tmp_path / "notes.pt")}))
    assert f"teacher.path: {tmp_path / 'notes.pt'} is not a PyTorch file" in line and not (tmp_path / "d").exists()
    import torch

    torch.save({"state": {"weight": torch.zeros(3)}}, tmp_path / "other.pt")
    line = refused(written, "cache-teacher", "--top-k", 4, "--out", tmp_path / "d",
                   *_sets(written, **{"teacher.path": str(tmp_path / "other.pt")}))
    assert "teacher.path" in line and "not weights of the job's [teacher] model" in line and not (tmp_path / "d").exists()
    # An existing cache, without --resume.
    line = refused(written, "cache-teacher", "--top-k", 8, "--out", written / "top8", *_sets(written))
    assert "already holds a teacher cache" in line
    # A classification job.
    proc = subprocess.run([sys.executable, "-m", "fastkd", "cache-teacher", "--top-k", "4", "--out", str(tmp_path / "d")],
                          env=lm_env(tmp_path), capture_output=True, text=True)
    assert "pass --data lm" in one_line_error(proc)


def test_a_crafted_teacher_file_is_refused_and_runs_nothing(written, tmp_path, refused):
    """teacher.path naming a .pt whose unpickling would run code (here: create a file): refused
    by cache-teacher (read with weights_only=True) and by distill (which loads directories only),
    with one line, before anything is written."""
    marker = tmp_path / "marker"
    crafted_pickle(tmp_path / "teacher_0.pt", marker)
    sets = _sets(written, **{"teacher.path": str(tmp_path / "teacher_0.pt")})
    line = refused(written, "cache-teacher", "--top-k", 4, "--out", tmp_path / "c", *sets)
    assert f"teacher.path: {tmp_path / 'teacher_0.pt'}: refused: unpickling it would call io.open" in line
    line = refused(written, "distill", "--out", tmp_path / "r", *sets)
    assert f"teacher: path {tmp_path / 'teacher_0.pt'} is not a from_pretrained directory" in line
    assert not marker.exists()
    assert not any((tmp_path / d).exists() for d in ("c", "c-teacher", "r"))


def test_a_teacher_with_non_finite_logits_stops_cache_teacher(written, tmp_path, capsys, monkeypatch):
    """A teacher whose output is not finite (an inf in a block's bias): cache-teacher stops with
    one line and exit status 3 before sampling from it (multinomial refuses NaN) and writes no
    shard."""
    import torch

    from fastkd.engine import checkpoint as ckpt
    from fastkd.engine.models import _offline_transformers

    model = _offline_transformers().GPT2LMHeadModel.from_pretrained(written / "top8-teacher" / "teacher")
    state = model.state_dict()
    state["transformer.h.1.mlp.c_proj.bias"][3] = float("inf")
    ckpt.save_model(str(tmp_path / "teacher.safetensors"), "teacher", state)
    monkeypatch.setenv("FASTKD_CACHE", str(written / "cache"))
    out = tmp_path / "c"
    proc = run_cli(capsys, "cache-teacher", CONFIGS / "lm.toml", "--sample", 4, "--out", out,
                   *_sets(written, **{"teacher.path": str(tmp_path / "teacher.safetensors")}))
    line = one_line_error(proc, 3)
    assert "the teacher's logits are not finite at position 0 of training window 0" in line
    assert str(tmp_path / "teacher.safetensors") in line and "no shard holding such rows was written" in line
    assert not list(out.glob("shard-*"))


def test_a_diverging_teacher_stops_cache_teacher_with_how_to_continue(tmp_path, capsys, monkeypatch):
    """The teacher cache-teacher trains has distill's guard, and the line says how to continue
    this command (its teacher run keeps its last good checkpoint; no cache is begun)."""
    write_corpus(tmp_path / "corpus")
    monkeypatch.setenv("FASTKD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "c"
    proc = run_cli(capsys, "cache-teacher", CONFIGS / "lm.toml", "--top-k", 4, "--out", out, *_sets(tmp_path, **{"train.lr": 1e30}))
    line = one_line_error(proc, 3)
    assert "teacher_0 diverged in phase 'teachers': its training loss was not finite at optimizer step 2;" in line
    assert line.endswith(f"continue with a lower learning rate: fastkd cache-teacher ... --out {out} --resume --set train.lr=1e+29")
    assert not out.exists() and not (tmp_path / "c-teacher" / "teacher").exists()


def test_a_non_finite_student_measures_nan_against_the_cache(written, monkeypatch):
    """Measured against the cache itself (its teacher gone), a student whose output is NaN has
    NaN agreement and KL, not the agreement of a NaN row's argmax with the cache's top entry."""
    import math

    import torch

    from fastkd.engine.config import load_config
    from fastkd.engine.tasks import make_task

    monkeypatch.setenv("FASTKD_CACHE", str(written / "cache"))
    overrides = tiny(written / "corpus", **{"teacher.cache": str(written / "top8")})
    task = make_task(load_config(str(CONFIGS / "lm.toml"), list(overrides.items()))).to(torch.device("cpu"))
    task.check(task.load())
    student = task.build("student", 0)
    m = task.cache_fidelity(student)
    assert 0 <= m["agreement"] <= 1 and m["predictive_kl"] >= 0
    with torch.no_grad():
        student.transformer.wte.weight.fill_(math.nan)
    m = task.cache_fidelity(student)
    assert math.isnan(m["agreement"]) and math.isnan(m["predictive_kl"]), m


def test_distill_config_refusals_with_a_cache(written, tmp_path, refused):
    from fastkd.engine.config import ConfigError, load_config

    lm = str(CONFIGS / "lm.toml")
    with pytest.raises(ConfigError, match=r"loss\[0\].tail applies to a teacher read from a cache"):
        load_config(lm, [("loss.0.tail", "renormalize")])
    with pytest.raises(ConfigError, match="teacher.cache holds a language model's teacher"):
        load_config(None, [("teacher.cache", "somewhere")])
    with pytest.raises(ConfigError, match="whose divergence is KL"):
        load_config(lm, [("teacher.cache", "somewhere"), ("loss.0.divergence", "jsd")])
    line = refused(written, "distill", "--teacher-cache", written / "top8", "--out", tmp_path / "r",
                   *_sets(written, **{"loss.0.tail": "uniform", "loss.0.values": "logits"}))
    assert "tail 'uniform' needs log-probabilities" in line
    line = refused(written, "distill", "--teacher-cache", tmp_path / "nothing", "--out", tmp_path / "r", *_sets(written))
    assert "holds no manifest.json" in line


def test_without_its_teacher_students_are_measured_against_the_cache(written, tmp_path):
    cache_dir = _copy(written, tmp_path)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    manifest["info"]["teacher"]["dir"] = str(tmp_path / "gone")
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    # The manifest is not hashed (the shards are): a moved teacher is named again by editing it.
    out = tmp_path / "run"
    proc = _run(tmp_path, "distill", "--teacher-cache", cache_dir, "--out", out, *_sets(tmp_path))
    assert proc.returncode == 0, proc.stderr
    s = summary(out)
    assert set(s["models"]) == {"student_baseline", "student_kd"}
    reference = "cached top-8 logprobs (training split): the teacher it was written with is not at hand"
    assert s["teacher_cache"]["reference"] == reference
    for m in s["models"].values():
        assert m["reference"] == reference and 0 <= m["agreement"] <= 1 and m["predictive_kl"] >= 0
    # A directory holding another teacher is not taken for it.
    manifest["info"]["teacher"]["dir"] = str(tmp_path / "other")
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    shutil.copytree(tmp_path / "top8-teacher" / "teacher", tmp_path / "other")
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tmp_path / "other" / "model.safetensors"))
    first = sorted(weights)[0]
    weights[first] = weights[first] + 1
    save_file(weights, str(tmp_path / "other" / "model.safetensors"), metadata={"format": "pt"})
    proc = _run(tmp_path, "distill", "--teacher-cache", cache_dir, "--out", tmp_path / "run2", *_sets(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "no longer holds the teacher the cache was written with" in summary(tmp_path / "run2")["teacher_cache"]["reference"]


def test_a_sampled_cache(written, tmp_path, refused):
    """--sample K: per token, the distinct draws with their log-frequency (float16), which
    distill reads with tail 'renormalize' at temperature 1 only."""
    out = tmp_path / "s16"
    proc = _run(written, "cache-teacher", "--sample", 16, "--out", out, "--teacher-out", written / "top8-teacher",
                *_sets(written))
    assert proc.returncode == 0, proc.stderr
    cache = tc.TeacherCache(out)
    assert (cache.selection, cache.value_dtype, cache.default_tail) == ("sample", "float16", "renormalize")
    assert cache.fingerprints["teacher"] == tc.TeacherCache(written / "top8").fingerprints["teacher"]
    idx, val = cache.rows(0, cache.tokens)
    p = val.exp()
    # Each row: frequencies count/16 summing to 1, on distinct indices; unused slots carry no mass.
    assert ((p.sum(-1) - 1).abs() < 1e-3).all()
    counts = p * 16
    assert ((counts - counts.round()).abs() < 2e-2).all()
    assert all(len(set(r.tolist())) == 16 for r in idx[:50])
    line = refused(written, "distill", "--teacher-cache", out, "--out", tmp_path / "r",
                   *_sets(written, **{"loss.0.temperature": 2.0}))
    assert "unbiased estimate only at temperature 1" in line
    proc = _run(written, "distill", "--teacher-cache", out, "--out", tmp_path / "r", *_sets(written))
    assert proc.returncode == 0, proc.stderr
    assert summary(tmp_path / "r")["teacher_cache"]["selection"] == "sample"


def test_the_measurement_record_and_its_report(written, tmp_path):
    """tools/teacher_cache_experiment.py collects a run folder (the online job, each cache, the students
    distilled from it) into one record, which bench.report renders as BENCHMARKS.md's section."""
    sys.path.insert(0, str(ROOT))
    from bench.report import render_cache_runs

    spec = importlib.util.spec_from_file_location("teacher_cache_experiment", ROOT / "tools" / "teacher_cache_experiment.py")
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    collect = experiment.collect

    folder = tmp_path / "runs"
    folder.mkdir()
    shutil.copytree(written / "top8", folder / "top8")
    for name, extra in (("online", ()), ("from-top8", ("--teacher-cache", folder / "top8"))):
        proc = _run(written, "distill", *extra, "--out", folder / name, *_sets(written))
        assert proc.returncode == 0, proc.stderr
    record = collect(folder)
    (cached,) = record["caches"]
    assert (cached["name"], cached["top_k"], cached["tokens"]) == ("top8", 8, 840)
    assert cached["write"]["tokens"] == 840 and cached["write"]["tokens_per_s"] > 0
    assert cached["student"]["models"]["student_kd"]["reference"] == "teacher_0"
    assert record["online"]["models"]["teacher"] == cached["student"]["models"]["teacher"]
    path = tmp_path / "teacher-cache-test.json"
    path.write_text(json.dumps(record))
    text = render_cache_runs([path])
    kd = record["online"]["models"]["student_kd"]
    assert "| online teacher (full distribution) | – | 100 % |" in text and f"{kd['perplexity']:.1f}" in text
    assert 0 < cached["kept_mass"] < 1
    assert f"| cache, top-8 | {cached['bytes_per_token']:.1f} B (bound 48) |" in text


def test_two_cpu_ranks_read_their_own_windows_rows(written, tmp_path):
    """torchrun with 2 gloo ranks: each rank reads the cached rows of its own windows of every
    batch; the students match a single process's to rounding (the ranks drop an odd last
    window, as without a cache)."""
    cache_dir = written / "top8"
    proc = torchrun(written, tmp_path / "ddp", "--teacher-cache", str(cache_dir), *as_args(tiny(written / "corpus")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    alone = _run(written, "distill", "--teacher-cache", cache_dir, "--out", tmp_path / "alone", *_sets(written))
    assert alone.returncode == 0, alone.stderr
    a, b = summary(tmp_path / "ddp")["models"], summary(tmp_path / "alone")["models"]
    assert a["teacher"] == b["teacher"]
    for name in ("student_baseline", "student_kd"):
        assert abs(a[name]["nll"] - b[name]["nll"]) < 0.02, name
