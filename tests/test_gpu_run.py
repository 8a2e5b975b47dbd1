"""tools/gpu_run.py, the prepared GPU command, checked without a GPU: its deadline plugin and the
reading of pytest's summary it reports from (the command itself runs on GPU hosts)."""

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import gpu_run  # noqa: E402


def _pytest(tmp_path, deadline: float) -> str:
    (tmp_path / "test_two.py").write_text("def test_a():\n    pass\n\ndef test_b():\n    pass\n")
    env = dict(os.environ, FASTKD_DEADLINE=str(deadline), PYTEST_PLUGINS="pytest_deadline",
               PYTHONPATH=os.pathsep.join([str(ROOT / "tools"), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return out.stdout


def test_no_test_starts_after_the_deadline_and_the_run_still_ends_with_its_summary(tmp_path):
    log = tmp_path / "pytest.log"
    log.write_text(_pytest(tmp_path, time.time() - 1))
    summary = gpu_run.summarise_pytest(log)
    assert summary["counts"] == {"skipped": 2}
    assert summary["not_started_deadline"] == 2


def test_before_the_deadline_tests_run(tmp_path):
    log = tmp_path / "pytest.log"
    log.write_text(_pytest(tmp_path, time.time() + 600))
    assert gpu_run.summarise_pytest(log) == {"counts": {"passed": 2}, "not_started_deadline": 0, "failed": []}


def test_failures_are_named(tmp_path):
    log = tmp_path / "pytest.log"
    log.write_text("FAILED tests/test_x.py::test_y[cuda] - AssertionError\nERROR tests/test_z.py::test_w\n"
                   "1 failed, 7 passed, 1 error in 3.2s\n")
    summary = gpu_run.summarise_pytest(log)
    assert summary["counts"] == {"failed": 1, "passed": 7, "error": 1}
    assert summary["failed"] == ["tests/test_x.py::test_y[cuda]", "tests/test_z.py::test_w"]


def test_every_gpu_and_triton_test_file_is_selected():
    paths = gpu_run.gpu_test_paths()
    on_disk = sorted(p.name for p in (ROOT / "tests").glob("test_*.py")
                     if p.name.endswith(("_gpu.py", "_triton.py")))
    assert sorted(Path(p).name for p in paths) == on_disk and on_disk
