"""One prepared command for a GPU host: build, GPU tests, GPU benchmarks, in a fixed time budget.

GPU time comes in short windows on a machine that starts bare and reaches no package index, so
this script does everything a GPU session needs in one call, in this order:

1. the environment (GPU, driver, torch, Triton, CUDA, Liger-Kernel) into ``gpu-run.json``;
2. Liger-Kernel from a wheel in ``.whl/`` (ignored by git; filled beforehand on a machine with an
   index by ``pip download liger-kernel==0.8.5 --no-deps -d .whl``), installed with ``--no-deps``
   into a scratch folder so the host's own torch and Triton are used;
3. the extension, built for this GPU's architecture only, with every core;
4. the GPU tests (every ``tests/test_*_gpu.py``, every Triton test on the device, and every test
   marked ``gpu``), a few xdist workers with few threads each so the CPU references do not starve
   the device, stopped at their deadline so that the benchmarks keep theirs;
5. ``fastkd bench --device cuda``: first the logit losses at the issue's sizes (N=2048 V=32000 and
   N=4096 V=128256, fp32 and bf16, with Liger where it has the op), then the feature and
   relational losses at their headline sizes; each writes its own results file as soon as it ends.

Everything lands in ``--out`` (at most 8 files, for the device tool's return): ``gpu-run.json``
(environment, each step's status, seconds and summary), ``build.log``, ``pytest.log``,
``bench.log``, ``bench-logits.json`` and ``bench-other.json`` (``fastkd bench`` results, rendered
by ``make bench`` once committed to ``bench/measured/``).

Run on the GPU host with its own Python (the one that holds torch), from the repository root::

    python3 tools/gpu_run.py --out "$OUT"          # or: make gpu PYTHON=python3 GPU_OUT="$OUT"

``--budget-s`` (default 480) is the whole wall-clock budget; ``--bench-s`` (default 270) the
part kept for the benchmarks. ``--dry-run`` checks the script itself on a machine without a GPU:
the same steps on the CPU with tiny selections, the build skipped.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".whl"
SITE = Path("/tmp/fastkd-gpu-site")

LOGIT_OPS = "kd_loss,dkd_loss,sparse_kd_loss"
LOGIT_SHAPES = "2048x32000,4096x128256"
OTHER_OPS = "hint_loss,attention_transfer_loss,rkd_distance_loss,rkd_angle_loss,sp_loss,pkt_loss,fused_linear_kd_loss"


class Clock:
    def __init__(self, budget_s: float):
        self.t0 = time.monotonic()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()


# A pytest run (the tests, or the one ``fastkd bench`` starts) given a deadline stops starting
# tests then and ends normally (tools/pytest_deadline.py), keeping its summary and measurements;
# the hard stop comes this many seconds later, for whatever still runs.
WIND_DOWN_S = 45


def run_logged(cmd, log: Path, env: dict, timeout: float) -> dict:
    """Runs ``cmd`` with its output appended to ``log``, pytest runs in it told to start nothing
    after ``timeout`` seconds, the whole process group killed ``WIND_DOWN_S`` later; returns
    exit code, seconds, and whether it was killed."""
    t0 = time.monotonic()
    env = dict(env, FASTKD_DEADLINE=str(time.time() + timeout), PYTEST_PLUGINS="pytest_deadline",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "tools"), env.get("PYTHONPATH")])))
    with open(log, "a") as f:
        f.write("+ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc, killed = proc.wait(timeout=max(timeout, 1) + WIND_DOWN_S), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, killed = None, True
            f.write(f"\n[gpu_run] killed {WIND_DOWN_S} s after its deadline ({timeout:.0f} s)\n")
    return {"rc": rc, "seconds": round(time.monotonic() - t0, 1), "killed": killed}


def environment(py: str) -> dict:
    probe = (
        "import json, torch\n"
        "d = {'torch': torch.__version__, 'cuda': torch.version.cuda, 'gpu': None}\n"
        "if torch.cuda.is_available():\n"
        "    p = torch.cuda.get_device_properties(0)\n"
        "    d.update(gpu=p.name, capability='%d.%d' % (p.major, p.minor), sms=p.multi_processor_count,\n"
        "             memory_gib=round(p.total_memory / 2**30, 1))\n"
        "try:\n"
        "    import triton; d['triton'] = triton.__version__\n"
        "except Exception as e: d['triton'] = 'not importable: %s' % e\n"
        "from importlib import metadata\n"
        "try: d['liger_kernel'] = metadata.version('liger-kernel')\n"
        "except metadata.PackageNotFoundError: d['liger_kernel'] = None\n"
        "print(json.dumps(d))\n"
    )
    out = subprocess.run([py, "-c", probe], capture_output=True, text=True, env=child_env())
    env = json.loads(out.stdout) if out.returncode == 0 else {"probe_error": out.stderr[-2000:]}
    env.update(python=platform.python_version(), host_cpus=os.cpu_count())
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem",
                            "--format=csv,noheader"], capture_output=True, text=True)
        env["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True).stdout.strip() or None
    except OSError:
        env["git_commit"] = None
    return env


def child_env(**extra) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    if SITE.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), env.get("PYTHONPATH")]))
    return env


def install_wheels(py: str, log: Path) -> dict:
    wheels = sorted(glob.glob(str(WHEELS / "*.whl")))
    if not wheels:
        return {"status": "no wheels in .whl/ (Liger-Kernel will be reported as not importable)"}
    r = run_logged([py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", str(SITE)] + wheels, log, child_env(), 120)
    return dict(r, wheels=[Path(w).name for w in wheels])


def build(py: str, log: Path, arch: str, clock: Clock) -> dict:
    extra = {"MAX_JOBS": str(os.cpu_count() or 2), "TORCH_CUDA_ARCH_LIST": arch}
    cmd = [py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."]
    return dict(run_logged(cmd, log, child_env(**extra), clock.left()), arch=arch)


def gpu_test_paths() -> list:
    """Every GPU test file and every Triton test file (on a GPU they run on the device)."""
    files = sorted(set(glob.glob(str(ROOT / "tests" / "test_*_gpu.py")) + glob.glob(str(ROOT / "tests" / "test_*_triton.py"))))
    return [os.path.relpath(f, ROOT) for f in files]


def summarise_pytest(log: Path) -> dict:
    """Counts from pytest's closing line, and the failing node ids (from -rfE)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    counts = {}
    tail = [x for x in text.splitlines() if re.search(r"\d+ (passed|failed|errors?|skipped|deselected).* in [\d.]+s", x)]
    if tail:
        for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", tail[-1]):
            counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.MULTILINE)))
    late = sum(int(n) for n in re.findall(r"^SKIPPED \[(\d+)\].*gpu_run deadline", text, re.MULTILINE))
    return {"counts": counts, "not_started_deadline": late, "failed": failed[:200]}


def tests(py: str, log: Path, timeout: float, dry_run: bool) -> dict:
    paths = gpu_test_paths()
    cmd = [py, "-m", "pytest", *paths, "-q", "-rfEs", "-p", "no:cacheprovider"]
    if dry_run:  # one small Triton file in the interpreter, no xdist (not in the dev requirements)
        paths = [p for p in paths if p.endswith("test_kd_triton.py")]
        cmd = [py, "-m", "pytest", *paths, "-q", "-rfEs", "-p", "no:cacheprovider", "-k", "opcheck or bad_input"]
    else:  # the GPU image has pytest-xdist
        cmd += ["-n", "6", "--dist", "loadfile"]
    # Each worker computes its CPU references on few threads: 6 workers x 2 threads leave the
    # 16-core host's cores to the launches instead of fighting over them.
    env = child_env(OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    r = run_logged(cmd, log, env, timeout)
    return dict(r, **summarise_pytest(log), files=paths)


def bench(py: str, log: Path, out_json: Path, args: list, timeout: float) -> dict:
    work = Path("/tmp") / f"fastkd-gpu-{out_json.stem}"
    shutil.rmtree(work, ignore_errors=True)
    r = run_logged([py, "-m", "fastkd", "bench", *args, "--out", str(work)], log, child_env(), timeout)
    src = work / "results.json"
    if src.exists():
        shutil.copy(src, out_json)
        data = json.loads(src.read_text())
        r.update(results=len(data.get("results", [])), elapsed_s=data.get("elapsed_s"), written=out_json.name)
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (on the device tool: $OUT)")
    ap.add_argument("--budget-s", type=float, default=480, help="whole wall-clock budget (default 480)")
    ap.add_argument("--bench-s", type=float, default=270, help="seconds kept for the benchmarks (default 270)")
    ap.add_argument("--skip-tests", action="store_true", help="build and benchmark only")
    ap.add_argument("--dry-run", action="store_true", help="the same steps on this CPU with tiny selections")
    args = ap.parse_args(argv)

    clock = Clock(args.budget_s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    record = {"command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])), "budget_s": args.budget_s,
              "steps": {}}
    report = out / "gpu-run.json"

    def save():
        record["elapsed_s"] = round(clock.elapsed(), 1)
        report.write_text(json.dumps(record, indent=1) + "\n")

    def step(name, result):
        record["steps"][name] = result
        print(f"[gpu_run] {clock.elapsed():6.0f} s  {name}: {json.dumps(result)[:300]}", flush=True)
        save()

    step("wheels", install_wheels(py, out / "build.log"))
    record["environment"] = environment(py)
    save()
    gpu = record["environment"].get("gpu")
    if gpu is None and not args.dry_run:
        step("abort", {"why": "no CUDA device visible to torch; --dry-run checks the script on a CPU"})
        return 2
    if args.dry_run:  # checks the script, not the build: the developer's extension stays as it is
        step("build", {"status": "skipped (--dry-run)"})
    else:
        step("build", build(py, out / "build.log", record["environment"].get("capability"), clock))
        if record["steps"]["build"]["rc"] != 0:
            return 1

    if not args.skip_tests:
        step("tests", tests(py, out / "pytest.log", clock.left() - args.bench_s - WIND_DOWN_S, args.dry_run))

    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        logits = ["--device", device, "--ops", "kd_loss", "--quick", "--shapes", "64x300", "--providers", "fastkd-cpu"]
        other = ["--device", device, "--ops", "hint_loss", "--quick", "--shapes", "8x64", "--providers", "fastkd-cpu"]
    else:
        logits = ["--device", device, "--ops", LOGIT_OPS, "--quick", "--shapes", LOGIT_SHAPES, "--dtype", "fp32,bf16"]
        other = ["--device", device, "--ops", OTHER_OPS, "--quick", "--suite", "headline"]
    # The logit losses are what the targets are about: they get two thirds of what is left.
    step("bench_logits", bench(py, out / "bench.log", out / "bench-logits.json", logits,
                               (clock.left() - 2 * WIND_DOWN_S) * 2 / 3))
    step("bench_other", bench(py, out / "bench.log", out / "bench-other.json", other, clock.left() - WIND_DOWN_S))
    failed = record["steps"].get("tests", {}).get("counts", {}).get("failed", 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
