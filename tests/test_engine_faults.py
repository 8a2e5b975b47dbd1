"""Runs that go wrong, on the tiny digits job: files fastkd must not load (a crafted pickle, a
run from before the safe format, a truncated or empty checkpoint), training that diverges, and
how it continues with a lower learning rate."""

import json
import math
import os
import shutil

import pytest
import torch

from engine_helpers import crafted_pickle, one_line_error, run_cli, summary
from fastkd import metrics
from fastkd.engine import checkpoint as ckpt

# Two epochs of 29 steps; one small teacher.
SETS = {"train.progress": "false", "train.plot": "false", "teacher.count": "1", "teacher.hidden": "[32]",
        "student.hidden": "[32]", "train.epochs": "2", "train.checkpoint_every": "5"}


def _args(**extra) -> list:
    out = []
    for k, v in {**SETS, **extra}.items():
        out += ["--set", f"{k}={v}"]
    return out


def _all_finite(state) -> bool:
    if torch.is_tensor(state):
        return not state.is_floating_point() or bool(torch.isfinite(state).all())
    if isinstance(state, dict):
        return all(_all_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(_all_finite(v) for v in state)
    return not isinstance(state, float) or math.isfinite(state)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (its checkpoint is the end-of-training one)."""
    from fastkd.cli import main

    out = tmp_path_factory.mktemp("faults") / "run"
    assert main(["distill", "--out", str(out), *_args(**{"train.epochs": "1"})]) == 0
    return out


def _copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


# -- files fastkd refuses to load ------------------------------------------------------------------


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    marker = tmp_path / "marker"
    crafted_pickle(run / "checkpoint.pt", marker)
    line = one_line_error(run_cli(capsys, "distill", "--resume", run))
    assert str(run / "checkpoint.pt") in line and "refused" in line and "io.open" in line
    assert not marker.exists()


@pytest.mark.parametrize("damage, expect", [("truncate", "is truncated or damaged"), ("empty", "is empty (0 bytes)")])
def test_a_damaged_checkpoint_is_refused_with_one_line(finished, tmp_path, capsys, damage, expect):
    run = _copy(finished, tmp_path)
    path = run / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"")
    line = one_line_error(run_cli(capsys, "distill", "--resume", run))
    assert line.startswith(f"fastkd: error: {path} {expect}"), line


def test_a_run_from_before_the_safe_format_is_not_resumed(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    saved = json.loads((run / "config.json").read_text())
    del saved["format_version"]  # what config.json looked like before
    (run / "config.json").write_text(json.dumps(saved))
    line = one_line_error(run_cli(capsys, "distill", "--resume", run))
    assert f"--resume: {run} predates fastkd's safe checkpoint format" in line
    # A checkpoint without the format's stamp, in a run that has it, is refused the same way.
    run2 = _copy(finished, tmp_path / "b")
    state = ckpt.load(str(run2 / "checkpoint.pt"))
    del state["format"]
    torch.save(state, run2 / "checkpoint.pt")
    line = one_line_error(run_cli(capsys, "distill", "--resume", run2))
    assert f"{run2 / 'checkpoint.pt'} predates fastkd's safe checkpoint format" in line


def test_resume_may_change_only_the_resumable_settings(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    line = one_line_error(run_cli(capsys, "distill", "--resume", run, "--set", "train.lr=0.001", "--set", "train.batch_size=16"))
    assert "train.batch_size (32 there, 16 here)" in line and "may change only train.lr, train.grad_clip" in line
    proc = run_cli(capsys, "distill", "--resume", run, "--set", "train.grad_clip=1.0")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "config.json").read_text())["changes"] == [
        {"from": "the end of training", "settings": {"train.grad_clip": [0.0, 1.0]}}]


def test_model_files_are_safetensors_and_read_without_unpickling(finished, tmp_path):
    role, state = ckpt.load_model(str(finished / "models" / "student_kd.safetensors"))
    assert role == "student" and set(state) == {"stem.0.weight", "stem.0.bias", "head.weight", "head.bias"}
    assert sorted(p.name for p in (finished / "models").iterdir()) == [
        "student_baseline.safetensors", "student_kd.safetensors", "teacher_0.safetensors"]
    # A .pt state dict (bare or under "state") is read with weights_only=True.
    torch.save({"state": state, "role": "student"}, tmp_path / "a.pt")
    torch.save(state, tmp_path / "b.pt")
    for name in ("a.pt", "b.pt"):
        got = ckpt.load_model(str(tmp_path / name))[1]
        assert all(got[k].equal(v) for k, v in state.items())
    # Tied weights (a language model's lm_head and embedding) are stored in full and read back.
    w = torch.randn(5, 3)
    ckpt.save_model(str(tmp_path / "tied.safetensors"), "teacher", {"emb": w, "head": w})
    assert all(t.equal(w) for t in ckpt.load_model(str(tmp_path / "tied.safetensors"))[1].values())
    marker = tmp_path / "marker"
    crafted_pickle(tmp_path / "evil.pt", marker)
    (tmp_path / "notes.pt").write_text("not a model")
    for name, expect in (("evil.pt", "refused: unpickling it would call io.open"), ("notes.pt", "is not a PyTorch file")):
        with pytest.raises(ckpt.CheckpointError, match=expect):
            ckpt.load_model(str(tmp_path / name))
    assert not marker.exists()


def test_teacher_path_does_not_apply_to_classification(tmp_path, capsys):
    marker = tmp_path / "marker"
    crafted_pickle(tmp_path / "teacher_0.pt", marker)
    line = one_line_error(run_cli(capsys, "distill", "--out", tmp_path / "r", *_args(**{"teacher.path": f'"{tmp_path / "teacher_0.pt"}"'})))
    assert "teacher.path loads a GPT-2 model" in line and not marker.exists() and not (tmp_path / "r").exists()


# -- divergence ------------------------------------------------------------------------------------


def test_the_issue_run_stops_at_its_first_bad_step_and_keeps_a_finite_checkpoint(tmp_path, capsys):
    """train.lr = 1e6 trains every model to NaN: the run stops with exit status 3 and one line
    instead of a table of 'perfect' agreement. With the default teacher, an update turns its
    weights (AdamW's decay alone multiplies them by 1 - lr·0.01 a step) non-finite while the
    loss before it was finite: the checkpoint of that step is not written (checked at every
    step here), the one before it is kept."""
    out = tmp_path / "run"
    sets = {"train.lr": "1e6", "train.checkpoint_every": "1", "teacher.hidden": "[256, 256]"}
    line = one_line_error(run_cli(capsys, "distill", "--out", out, *_args(**sets)), 3)
    assert "teacher_0 diverged in phase 'teachers'" in line and "train.lr = 1e+06 is likely too high" in line
    assert f"fastkd distill --resume {out} --set train.lr=100000" in line
    state = ckpt.load(str(out / "checkpoint.pt"))
    step = state["phase_state"]["opt_steps"]
    assert f"{out / 'checkpoint.pt'} at optimizer step {step} of phase 'teachers', is kept" in line
    assert f"its weights or optimizer state were not finite after optimizer step {step + 1};" in line
    assert _all_finite(state)
    assert not (out / "summary.json").exists() and not list((out / "models").iterdir())


def test_a_diverged_run_continues_from_its_last_good_checkpoint_with_a_lower_lr(tmp_path, capsys, monkeypatch):
    """A run stopped at its checkpoint of step 10 is resumed with train.lr = 1e30: step 11
    (from the checkpoint's weights) is finite, its update makes every weight ~1e30, so step 12
    overflows. The phase is checked at step 15 (its next checkpoint) and stops naming step 12,
    the first bad one; the checkpoint of step 10 stays. Resumed from it with the run's own
    learning rate, it ends exactly as a run never interrupted does."""
    from fastkd.engine.runner import Interrupted

    reference = tmp_path / "reference"
    assert run_cli(capsys, "distill", "--out", reference, *_args()).returncode == 0

    out = tmp_path / "run"
    save = ckpt.save

    def stop_at_step_10(path, state):  # Ctrl-C right after the checkpoint of step 10
        save(path, state)
        if state["phase_state"] is not None and state["phase_state"]["opt_steps"] == 10:
            raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save", stop_at_step_10)
    assert run_cli(capsys, "distill", "--out", out, *_args()).returncode == 130
    monkeypatch.undo()
    kept = (out / "checkpoint.pt").read_bytes()

    proc = run_cli(capsys, "distill", "--resume", out, "--set", "train.lr=1e30", "--set", "train.grad_clip=1.0")
    line = one_line_error(proc, 3)
    assert proc.stderr.startswith(f"resuming {out} from its checkpoint at optimizer step 10 of phase 'teachers', "
                                  "with train.lr 0.003 -> 1e+30; train.grad_clip 0.0 -> 1.0\n")
    assert ("teacher_0 diverged in phase 'teachers': its training loss was not finite at optimizer step 12; "
            "train.lr = 1e+30 is likely too high") in line
    assert f"the last good checkpoint, {out / 'checkpoint.pt'} at optimizer step 10 of phase 'teachers', is kept" in line
    assert line.endswith(f"continue with a lower learning rate: fastkd distill --resume {out} --set train.lr=1e+29")
    assert (out / "checkpoint.pt").read_bytes() == kept and not (out / "summary.json").exists()

    proc = run_cli(capsys, "distill", "--resume", out, "--set", "train.lr=0.003", "--set", "train.grad_clip=0.0")
    assert proc.returncode == 0, proc.stderr
    assert f"resuming {out} from its checkpoint at optimizer step 10 of phase 'teachers'" in proc.stderr
    assert summary(out)["models"] == summary(reference)["models"]
    assert (out / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    changes = json.loads((out / "config.json").read_text())["changes"]
    assert [c["settings"]["train.lr"] for c in changes] == [[0.003, 1e30], [1e30, 0.003]]


def test_non_finite_gradients_after_clipping_stop_the_phase(tmp_path, capsys, monkeypatch):
    """The clipped gradient norm is watched too (a loss can be finite while its gradients are
    not): an infinite norm at the third step stops the phase, found at the first check after
    it (the end of the epoch: no checkpoint before it)."""
    from fastkd.engine import distributed as dist

    clip, calls = dist.clip_grad_norm, []

    def infinite_at_the_third_step(wrapped, params, max_norm):
        calls.append(1)
        norm = clip(wrapped, params, max_norm)
        return norm + math.inf if len(calls) == 3 else norm

    monkeypatch.setattr(dist, "clip_grad_norm", infinite_at_the_third_step)
    out = tmp_path / "run"
    line = one_line_error(run_cli(capsys, "distill", "--out", out, *_args(**{"train.grad_clip": "1.0", "train.checkpoint_every": "0"})), 3)
    assert ("teacher_0 diverged in phase 'teachers': its gradients were not finite at optimizer step 3 "
            "(norm at train.grad_clip = 1); train.lr = 0.003 is likely too high; no checkpoint was written before it") in line
    assert len(calls) == 29  # checked at the epoch's end


def test_metrics_of_a_non_finite_model_are_nan_never_perfect_agreement():
    """A NaN model has the same argmax as a NaN teacher and a NaN teacher's probabilities fail
    `p > 0`: without care, agreement 1 and KL 0. Every metric of such a model is NaN; one NaN
    row is enough; the table shows nan."""
    from fastkd.engine.report import table

    gen = torch.Generator().manual_seed(0)
    good = metrics.log_probs(torch.randn(50, 10, generator=gen))
    labels = torch.randint(0, 10, (50,), generator=gen)
    nan = torch.full_like(good, math.nan)
    one_row = good.clone()
    one_row[7] = math.nan
    for student, teacher in ((nan, nan), (nan, good), (good, nan), (one_row, good)):
        m = metrics.classification_metrics(student, labels, teacher)
        assert math.isnan(m["agreement"]) and math.isnan(m["predictive_kl"]), m
        if student is not good:
            assert all(math.isnan(m[k]) for k in ("accuracy", "nll", "ece")), m
    m = metrics.classification_metrics(good, labels, good)
    assert m["agreement"] == 1.0 and m["predictive_kl"] == 0.0 and math.isfinite(m["ece"])
    row = table({"student_kd": metrics.classification_metrics(nan, labels, nan)}).splitlines()[-1]
    assert row.split()[1:] == ["nan"] * 5


def test_the_report_plots_a_nan_metric(tmp_path):
    """report.png of a summary holding NaN metrics (a NaN first sets no axis limit)."""
    from fastkd.engine.report import plot

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"phase": "teachers", "model": "teacher", "split": "val", "epoch": 1,
                                                        "accuracy": 0.9, "train_loss": 0.3}) + "\n")
    nan = {"accuracy": math.nan, "nll": math.nan, "ece": math.nan, "agreement": math.nan, "predictive_kl": math.nan}
    models = {"teacher": {"accuracy": 0.9, "nll": 0.3, "ece": 0.02}, "student_baseline": nan,
              "student_kd": {"accuracy": 0.8, "nll": 0.5, "ece": 0.03, "agreement": 0.9, "predictive_kl": 0.1}}
    plot(str(tmp_path / "metrics.jsonl"), {"models": models, "method": "distill", "data": {"name": "digits"}},
         str(tmp_path / "report.png"))
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
