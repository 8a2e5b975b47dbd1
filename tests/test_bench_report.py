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
    # The static GPU section (tools/gpu_static.py): its verdict here, every kernel's resources beside the report.
    assert "## GPU kernels, statically" in text and "(report-gpu-static.md)" in text
    assert "| Triton `_kd_forward_kernel` | sm_90 |" in (tmp_path / "report-gpu-static.md").read_text()

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
    assert "| Triton `_kd_forward_kernel` | sm_90 |" in (tmp_path / "again-gpu-static.md").read_text(), \
        "the static section was not kept in the JSON"


def _synthetic_run(device="cpu"):
    """A pytest-benchmark JSON of one headline kd case (eager, compile, fastkd) and a copy probe:
    what bench.report reads, without running anything."""
    def bench(name, median, extra):
        stats = dict(rounds=5, min=median * 0.9, median=median, max=median * 1.1, iqr=median * 0.1)
        return dict(name=name, stats=stats, extra_info=extra)

    case = dict(kind="op", op="kd", case="kd-fp32-8x100-T2-cpu", title="kd · fp32 · N=8 · V=100 · temperature=2 · cpu",
                headline=True, n=8, v=100, dtype="fp32", device=device, unit_bytes=3200, bound_bytes=9600, bound_units=3,
                composite_text="F.kl_div(...)", traffic_note="3 N*V")
    runs = [bench(f"test_kd[{p}]", t, dict(case, provider=p, provider_title=p, pass_="fwdbwd"))
            for p, t in (("eager", 8e-3), ("compile", 4e-3), ("fastkd-cpu", 1e-3))]
    copy = bench("test_memsys_copy_start[cpu]", 1e-3, dict(kind="copy", when="start", device=device, bytes_moved=2 ** 24))
    return {"benchmarks": [copy] + runs, "fastkd": {"machine": {"date_utc": "2026-01-01 00:00:00 UTC"}, "cases": [case["case"]]}}


def test_benchmarks_md_layout_gpu_first_and_long_tables_beside_it(tmp_path):
    """BENCHMARKS.md's layout: the summary per op (committed GPU run beside this run), the GPU
    sections before this run's, the raw statistics in a file of their own, linked."""
    sys.path.insert(0, str(ROOT))
    from bench import report

    js = tmp_path / "run.json"
    js.write_text(json.dumps(_synthetic_run()))
    gpu = ROOT / "bench" / "measured" / "h200-2026-12-04.json"
    assert report.main(["--from-json", str(js), "--out", str(tmp_path / "B.md"), "--no-gpu-static", "--gpu-runs", str(gpu)]) == 0
    text = (tmp_path / "B.md").read_text()
    heads = [line for line in text.splitlines() if line.startswith("## ")]
    order = ["## Summary", "## Measured on a GPU (committed runs)", "## Machine", "## Targets", "## Results",
             "## How this is measured", "## Raw statistics"]
    assert [h for h in heads if h in order] == order, heads
    # The summary's kd row: the H200 run's 1.30x over compile, and this run's 4.00x and 8.00x.
    row = next(line for line in text.split("## Summary")[1].splitlines() if line.startswith("| kd |"))
    assert [c.strip() for c in row.strip("|").split("|")][1:] == ["2048x32000 fp32", "1.30×", "3.61×", "34.7 %", "8x100 fp32", "4.00×", "8.00×", "0.1 %"], row
    # What the GPU run found, kept beside its JSON, is shown with it.
    assert "**What this run found.**" in text.split("## Measured on a GPU")[1].split("## Machine")[0]
    # Raw statistics only in their own file, linked; no static section or file without the check.
    raw = tmp_path / "B-raw.md"
    assert "(B-raw.md)" in text and "`test_kd[fastkd-cpu]`" not in text
    assert "| `test_kd[fastkd-cpu]` | 5 | 0.000900 | 0.001000 |" in raw.read_text()
    assert "GPU kernels, statically" not in text and not (tmp_path / "B-gpu-static.md").exists()
    # BENCHMARKS.md itself keeps its side files in docs/.
    assert report.side_files(ROOT / "BENCHMARKS.md") == {"gpu_static": ROOT / "docs" / "gpu-static.md",
                                                        "raw": ROOT / "docs" / "benchmarks-raw.md"}
