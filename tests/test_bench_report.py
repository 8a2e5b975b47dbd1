"""Smoke test of the benchmark report: `python -m bench.report --quick` runs end to end and writes a
report whose structure is complete. Times at these tiny sizes mean nothing; nothing is asserted on
them (tests assert correctness, not time)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_report_is_complete(tmp_path):
    out, js = tmp_path / "report.md", tmp_path / "run.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run(
        [sys.executable, "-m", "bench.report", "--quick", "--out", str(out), "--json", str(js)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = out.read_text()
    for needle in ("# fastkd benchmarks", "Quick run", "## Machine"):
        assert needle in text, needle
    assert re.search(r"Copy bandwidth used for the traffic bound \(cpu\): [0-9.]+ GB/s", text)
    assert "### kd · fp32 · N=64 · V=1000" in text and "### kd · bf16 · N=32 · V=517" in text
    table_rows = [line for line in text.splitlines() if line.startswith("|")]
    assert not any("⚠" in row for row in table_rows), "a provider's answer was flagged wrong"
    assert not any(re.search(r"\bnan\b", row.lower()) for row in table_rows)
    assert any(status in text for status in ("met", "not met"))
    # The static GPU section (tools/gpu_static.py): resources of every GPU kernel, no GPU needed.
    assert "## GPU kernels, statically" in text and "| Triton `_kd_forward_kernel` | sm_90 |" in text

    data = json.loads(js.read_text())
    ops = [b for b in data["benchmarks"] if b["extra_info"].get("kind") == "op"]
    assert ops and all(b["stats"]["median"] > 0 for b in ops)
    for b in ops:
        if b["extra_info"]["pass_"] == "fwdbwd":
            assert b["extra_info"]["check"]["ok"], b["name"]
            assert b["extra_info"]["peak_alloc_units"] > 0, b["name"]

    again = subprocess.run(
        [sys.executable, "-m", "bench.report", "--from-json", str(js), "--out", str(tmp_path / "again.md")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    again_text = (tmp_path / "again.md").read_text()
    assert again_text.startswith("# fastkd benchmarks")
    assert "| Triton `_kd_forward_kernel` | sm_90 |" in again_text, "the static section was not kept in the JSON"
