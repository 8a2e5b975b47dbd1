"""`fastkd bench`: the kernel microbenchmarks as a command (fastkd/bench_cli.py on the bench/ suite).

One tiny real run (`--quick` at a small `--shapes`, two ops, cpu) checks the three kinds of
output and that a failing provider is reported while the run goes on; bad arguments are checked
in-process. Times at these sizes mean nothing: nothing is asserted on them.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastkd import bench_cli, cli

ROOT = Path(__file__).resolve().parent.parent


def test_public_ops_are_the_registered_ops(monkeypatch):
    """PUBLIC_OPS (what --ops accepts) names exactly the ops bench/ registers."""
    monkeypatch.syspath_prepend(str(ROOT))
    for f in sorted((ROOT / "bench").glob("test_bench_*.py")):
        importlib.import_module(f"bench.{f.stem}")
    common = importlib.import_module("bench.common")
    named = set(bench_cli.PUBLIC_OF) | set(bench_cli.EXTRA_BENCH_OPS)
    assert named == set(common.OPS), named ^ set(common.OPS)
    # Every public op has a headline case (what --quick and --shapes measure) and a sweep.
    heads = {c.op for c in common.headline_cases()}
    swept = {c.op for c in common.SWEEP_CASES}
    for op in bench_cli.PUBLIC_OF:
        assert op in heads and op in swept, op


def test_suite_is_found_next_to_the_running_fastkd():
    import fastkd

    d = bench_cli.bench_dir()
    assert (d / "conftest.py").is_file() and (d / "common.py").is_file()
    assert d.parent in (Path(fastkd.__file__).resolve().parent, Path(fastkd.__file__).resolve().parent.parent)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--ops", "kd_loss,nope"], "--ops: unknown op 'nope'"),
        (["--device", "tpu"], "--device: unknown device 'tpu'"),
        (["--shapes", "12x"], "--shapes: malformed shape '12x'"),
        (["--shapes", "64x1000,axb"], "--shapes: malformed shape 'axb'"),
        (["--dtype", "fp8"], "--dtype: unknown dtype 'fp8'"),
        (["--providers", "nope"], "--providers: unknown provider 'nope'"),
        (["--suite", "nope"], "--suite"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, needle, capsys, tmp_path):
    rc = cli.main(["bench", *argv, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("fastkd: error: ") and needle in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where no CUDA device exists")
def test_cuda_without_a_cuda_device_exits_2(capsys):
    assert cli.main(["bench", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device cuda: no CUDA device is available" in err, err


def test_missing_pytest_benchmark_exits_2(monkeypatch, capsys, tmp_path):
    real = bench_cli._find_spec
    monkeypatch.setattr(bench_cli, "_find_spec", lambda name: None if name == "pytest_benchmark" else real(name))
    assert cli.main(["bench", "--quick", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs pytest-benchmark" in err and "pip install" in err, err


def test_an_existing_run_is_not_overwritten(capsys, tmp_path):
    (tmp_path / "results.json").write_text("{}")
    assert cli.main(["bench", "--out", str(tmp_path)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_the_installed_command_exits_2():
    run = subprocess.run([sys.executable, "-m", "fastkd", "bench", "--shapes", "12x"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "fastkd: error: --shapes: malformed shape '12x' (expected NxV, two positive integers, e.g. 2048x32000)"
    ]


@pytest.mark.slow
def test_tiny_run_writes_results_and_reports_a_failing_provider(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    # fastkd's cpu backend made to fail on hint (a test-only hook): reported, and the run goes on.
    env["FASTKD_BENCH_FAIL"] = "fastkd-cpu:hint"
    run = subprocess.run(
        [sys.executable, "-m", "fastkd", "bench", "--quick", "--shapes", "16x300", "--ops", "kd,hint_loss",
         "--device", "cpu", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + (out / "pytest.log").read_text()[-3000:]

    # results.json: the machine, then per op, shape, dtype, provider.
    res = json.loads((out / "results.json").read_text())
    for key in ("command", "elapsed_s", "selection", "machine", "bandwidth_bytes_per_s", "peers", "results",
                "targets", "plots", "pytest_benchmark"):
        assert key in res, key
    for key in ("cpu_model", "cpu_flags", "cpu_isa", "logical_cpus", "torch", "gpu", "git_commit",
                "loadavg_start", "loadavg_end"):
        assert key in res["machine"], key
    rows = {(r["op"], r["provider"]): r for r in res["results"]}
    assert {r["shape"] for r in res["results"]} == {"16x300"}
    for op in ("kd", "hint"):
        for prov in ("eager", "compile"):
            assert rows[(op, prov)]["status"] == "ok", rows[(op, prov)]
    ok = rows[("kd", "fastkd-cpu")]
    assert ok["status"] == "ok" and ok["public_op"] == "kd_loss" and ok["dtype"] == "fp32"
    for p in ("fwd", "bwd", "fwdbwd"):
        for key in ("median_ms", "iqr_ms", "min_ms", "rounds", "pct_bound", "speedup_compile"):
            assert key in ok[p], (p, key)
        assert ok[p]["median_ms"] > 0
    for key in ("peak_extra_bytes", "peak_extra_units", "loss_rel_err", "grad_rel_err", "check_ok"):
        assert key in ok, key
    assert ok["check_ok"] is True
    failed = rows[("hint", "fastkd-cpu")]
    assert failed["status"] == "failed" and "injected by FASTKD_BENCH_FAIL" in failed["reason"], failed
    assert res["peers"]["liger"]["compared"] is False

    # The terminal: a summary table, the failure and the peer library, one line each.
    lines = run.stdout.splitlines()
    assert any(line.startswith("kd ") and "16x300" in line for line in lines), run.stdout
    assert sum("fastkd-cpu failed on hint-fp32-16x300" in line and "injected" in line for line in lines) == 1
    assert sum(line.startswith("Peer library: Liger-Kernel") and "not compared" in line for line in lines) == 1
    assert "hint-fp32-16x300" in run.stderr  # a progress bar per case

    # results.md: the summary and the report's tables.
    md = (out / "results.md").read_text()
    for needle in ("## Summary", "## Machine", "## Results", "fastkd-cpu failed on hint", "Liger-Kernel",
                   "![fastkd's speed-up over torch.compile](overview.png)"):
        assert needle in md, needle
    assert "GPU kernels, statically" not in md

    # Plots: per op, and the overview.
    assert set(res["plots"]) == {"overview.png", "kd.png", "hint.png"}
    for name in res["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    # make bench's second step: BENCHMARKS.md rendered from results.json by the existing renderer.
    again = subprocess.run(
        [sys.executable, "-m", "bench.report", "--from-json", str(out / "results.json"), "--out", str(tmp_path / "B.md")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    text = (tmp_path / "B.md").read_text()
    assert text.startswith("# fastkd benchmarks") and "Generated by `fastkd bench --quick --shapes 16x300" in text
    assert "## Targets" in text
