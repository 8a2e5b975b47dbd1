"""What the benchmarks measure, and with what: ops, cases, providers, probes.

Everything here is plain Python with no pytest in it, so that ``bench/test_bench_kd.py`` (the
timed runs), ``bench/conftest.py`` (selection) and ``bench/report.py`` (BENCHMARKS.md) share one
description of the suite.

Extending the suite
-------------------
* A new op family (reverse KL, JSD, ...): add an :class:`Op` to ``OPS`` (its composite, i.e. what
  users write today in PyTorch, its fused fastkd call, and how many ``[N, V]`` tensors a fused
  pass must move), then add :class:`Case` rows naming it to ``FULL_CASES`` / ``QUICK_CASES``.
* A new provider (a fastkd backend, another library): append a :class:`Provider` to
  ``PROVIDERS``. ``check`` returns ``None`` when it can run a case, else the reason it cannot;
  such a provider is reported as unavailable, never crashed on. The fastkd ``triton`` and
  ``cuda`` backends are already listed: they run on CUDA tensors, and CUDA cases are selected
  only where a CUDA device exists (``--bench-devices``).
"""

from __future__ import annotations

import functools
import gc
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

PASSES = ("fwd", "bwd", "fwdbwd")
PASS_TITLES = {"fwd": "forward", "bwd": "backward", "fwdbwd": "forward+backward"}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------
# Ops: one per loss family. `traffic` gives the [N, V] tensors a fused implementation must move
# per pass (reads + writes), in units of N*V*itemsize.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    name: str
    title: str
    composite: Callable[..., torch.Tensor]  # (s, t, **params) -> loss: what users write today
    fused: Callable[..., torch.Tensor]  # (s, t, backend, **params) -> loss, via fastkd
    traffic: Dict[str, int]  # pass -> number of N*V tensors read + written by a fused pass
    traffic_note: str


def kd_composite(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD as users write it: KL(softmax(t/T) || softmax(s/T)) * T^2, batchmean."""
    return (
        F.kl_div(
            F.log_softmax(s / temperature, dim=-1),
            F.log_softmax(t / temperature, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        * temperature
        * temperature
    )


def kd_fused(s: torch.Tensor, t: torch.Tensor, backend: str, temperature: float) -> torch.Tensor:
    import fastkd

    return fastkd.kd_loss(s, t, temperature, backend=backend)


OPS: Dict[str, Op] = {
    "kd": Op(
        name="kd",
        title="kd_loss (forward KL, Hinton)",
        composite=kd_composite,
        fused=kd_fused,
        traffic={"fwd": 2, "bwd": 2, "fwdbwd": 3},
        traffic_note=(
            "fwd (loss only, no_grad): read student + teacher = 2 N*V; "
            "fwd+bwd: read student + teacher, write the gradient = 3 N*V; "
            "bwd alone: read the gradient saved by the fused forward and write it scaled by "
            "grad_output = 2 N*V (fastkd's backward scales in place; this is the bound for that "
            "design, not for every design: a backward that skipped the scale when grad_output "
            "is 1 would move nothing)"
        ),
    ),
}


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    op: str
    n: int
    v: int
    dtype: str  # key of DTYPES
    params: Tuple[Tuple[str, float], ...] = (("temperature", 2.0),)
    headline: bool = False
    device: str = "cpu"

    @property
    def name(self) -> str:
        extra = "-".join(f"{k[0].upper()}{v:g}" for k, v in self.params)
        return f"{self.op}-{self.dtype}-{self.n}x{self.v}-{extra}-{self.device}"

    @property
    def title(self) -> str:
        extra = ", ".join(f"{k}={v:g}" for k, v in self.params)
        return f"{OPS[self.op].name} · {self.dtype} · N={self.n} · V={self.v} · {extra} · {self.device}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def unit_bytes(self) -> int:
        """Bytes of one N x V tensor of the student dtype: the unit of memory and traffic."""
        return self.n * self.v * self.itemsize

    def kwargs(self) -> Dict[str, float]:
        return dict(self.params)

    def with_device(self, device: str) -> "Case":
        return Case(self.op, self.n, self.v, self.dtype, self.params, self.headline, device)


# The headline first; the others change the row/vocabulary balance and the dtype.
# Sized so that the whole full run stays under ~10 minutes on a 2-core machine.
FULL_CASES: List[Case] = [
    Case("kd", 2048, 32000, "fp32", headline=True),
    Case("kd", 4096, 8192, "fp32"),
    Case("kd", 512, 131072, "fp32"),
    Case("kd", 2048, 32000, "bf16"),
]

# Tiny shapes for a smoke test: seconds, not minutes (odd V on purpose).
QUICK_CASES: List[Case] = [
    Case("kd", 64, 1000, "fp32", headline=True),
    Case("kd", 32, 517, "bf16"),
]


# ----------------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Provider:
    name: str
    title: str
    devices: Tuple[str, ...]
    build: Callable[[Op, Case], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
    check: Callable[[Op, Case], Optional[str]] = lambda op, case: None
    is_baseline: bool = False


def _build_eager(op: Op, case: Case):
    kw = case.kwargs()
    return lambda s, t: op.composite(s, t, **kw)


_COMPILED: Dict[Tuple[str, str], Callable] = {}


def _build_compile(op: Op, case: Case):
    """torch.compile of the composite, compiled afresh for each case with static shapes.

    ``torch._dynamo.reset()`` between cases: dynamo keys its cache on the function's code
    object, so successive cases would otherwise count towards the recompile limit and, from the
    second shape on, be compiled with dynamic shapes (slower code than users of one shape get).
    """
    key = (op.name, case.name)
    if key not in _COMPILED:
        _COMPILED.clear()
        torch._dynamo.reset()
        kw = case.kwargs()

        def composite(s, t):
            return op.composite(s, t, **kw)

        _COMPILED[key] = torch.compile(composite, dynamic=False)
    return _COMPILED[key]


def _check_compile(op: Op, case: Case) -> Optional[str]:
    if case.device == "cpu":
        import shutil

        if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
            return "torch.compile needs a C++ compiler on CPU and none was found"
    return None


@functools.lru_cache(maxsize=None)
def _fastkd_probe(backend: str, dtype: str, device: str) -> Optional[str]:
    """None when ``fastkd.kd_loss(..., backend=backend)`` runs forward and backward on a tiny
    input of this dtype and device, else the reason (the exception's first line)."""
    try:
        import fastkd
    except Exception as exc:  # noqa: BLE001 - any failure is a reason to report
        return f"import fastkd failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    try:
        s = torch.randn(3, 7, dtype=DTYPES[dtype], device=device, requires_grad=True)
        t = torch.randn(3, 7, dtype=DTYPES[dtype], device=device)
        fastkd.kd_loss(s, t, 2.0, backend=backend).backward()
        if s.grad is None or not bool(torch.isfinite(s.grad).all()):
            return "ran, but produced no finite gradient on a 3x7 input"
    except Exception as exc:  # noqa: BLE001
        msg = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {msg[0] if msg else ''}"
    return None


def _fastkd_provider(backend: str, devices: Tuple[str, ...]) -> Provider:
    def build(op: Op, case: Case):
        kw = case.kwargs()
        return lambda s, t: op.fused(s, t, backend, **kw)

    def check(op: Op, case: Case) -> Optional[str]:
        if case.device not in devices:
            return f"fastkd backend {backend!r} runs on {'/'.join(devices)} tensors"
        return _fastkd_probe(backend, case.dtype, case.device)

    return Provider(f"fastkd-{backend}", f"fastkd `backend=\"{backend}\"`", devices, build, check)


PROVIDERS: List[Provider] = [
    Provider("eager", "eager composite (PyTorch)", ("cpu", "cuda"), _build_eager, is_baseline=True),
    Provider("compile", "torch.compile(composite)", ("cpu", "cuda"), _build_compile, _check_compile, is_baseline=True),
    _fastkd_provider("cpu", ("cpu",)),
    _fastkd_provider("triton", ("cuda",)),
    _fastkd_provider("cuda", ("cuda",)),
]
PROVIDER_BY_NAME = {p.name: p for p in PROVIDERS}
BASELINES = ("eager", "compile")


def available_devices() -> List[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# Inputs and a reference for a sanity check (benchmarks flag a wrong answer; tests/ assert it)
# ----------------------------------------------------------------------------------------------

_INPUTS: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
_REFERENCE: Dict[str, Tuple[float, torch.Tensor]] = {}


def inputs(case: Case) -> Tuple[torch.Tensor, torch.Tensor]:
    """Student (a leaf that requires grad) and teacher logits, std 2, kept for the case's tests."""
    if case.name not in _INPUTS:
        _INPUTS.clear()
        _REFERENCE.clear()
        gc.collect()
        g = torch.Generator().manual_seed(0)
        s = (torch.randn(case.n, case.v, generator=g) * 2.0).to(case.torch_dtype).to(case.device)
        t = (torch.randn(case.n, case.v, generator=g) * 2.0).to(case.torch_dtype).to(case.device)
        _INPUTS[case.name] = (s.requires_grad_(True), t)
    return _INPUTS[case.name]


def reference(case: Case) -> Tuple[float, torch.Tensor]:
    """Loss and student gradient of the composite in float32 on the same inputs."""
    if case.name not in _REFERENCE:
        s, t = inputs(case)
        s32 = s.detach().float().requires_grad_(True)
        loss = OPS[case.op].composite(s32, t.detach().float(), **case.kwargs())
        loss.backward()
        _REFERENCE[case.name] = (float(loss.detach()), s32.grad)
    return _REFERENCE[case.name]


def compare(case: Case, loss: torch.Tensor, grad: Optional[torch.Tensor]) -> Dict[str, float]:
    ref_loss, ref_grad = reference(case)
    out = {"loss_rel_err": abs(float(loss) - ref_loss) / max(abs(ref_loss), 1e-30)}
    if grad is not None:
        out["grad_rel_err"] = float((grad.float() - ref_grad).abs().max() / ref_grad.abs().max().clamp_min(1e-30))
    return out


# Flag (not fail) a provider whose answer is further than this from the float32 composite.
CHECK_TOL = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 1e-2}


# ----------------------------------------------------------------------------------------------
# Peak extra memory, two independent ways
# ----------------------------------------------------------------------------------------------


def peak_alloc_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """Peak bytes held by torch's allocator during ``fn()`` beyond what was held before.

    CPU: torch's CPU allocator keeps no peak counter, so this runs ``fn`` under
    ``torch.profiler.profile(profile_memory=True)`` and takes the running sum of the raw
    ``[memory]`` events (+bytes on allocation, -bytes on free) in time order. The raw kineto
    events are used because the aggregated ``prof.events()`` folds allocations into the op that
    made them, losing the order of allocations and frees. Frees of blocks allocated before the
    profiler started are not reported, so callers free such blocks (e.g. an old ``.grad``)
    beforehand. CUDA: the caching allocator's own peak counter.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return peak


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


@functools.lru_cache(maxsize=None)
def rss_unavailable() -> Optional[str]:
    if not sys.platform.startswith("linux"):
        return "needs Linux /proc"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status("VmHWM")
    except OSError as exc:
        return f"cannot reset the peak RSS ({exc})"
    return None


def peak_rss_bytes(fn: Callable[[], object]) -> Optional[int]:
    """Peak resident memory during ``fn()`` beyond the resident memory before it (Linux).

    Resets the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``), runs ``fn`` and
    reads ``VmHWM`` from ``/proc/self/status``. Independent of torch: it also sees memory a C++
    kernel takes with malloc/new/OpenMP rather than through torch's allocator. It counts pages
    touched, not allocated, and only sees a free when the pages go back to the OS (glibc returns
    blocks above its mmap threshold, at most 32 MiB, at once; smaller ones may stay resident),
    so it is meaningful for the full-size cases, not for ``--quick``.
    """
    if rss_unavailable() is not None:
        return None
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _proc_status("VmRSS")
    fn()
    return _proc_status("VmHWM") - base


def memory_calibration(n: int, v: int, dtype: torch.dtype) -> Dict[str, Optional[float]]:
    """Both memory probes on an op that allocates exactly one n x v tensor and keeps it.

    Should read 1.00 (allocator) and ~1.00 (RSS) N x V units; the report prints it beside the
    results, so every run shows that its memory numbers can be trusted.
    """
    unit = n * v * torch.empty((), dtype=dtype).element_size()
    kept: List[torch.Tensor] = []
    alloc = peak_alloc_bytes(lambda: kept.append(torch.empty(n, v, dtype=dtype).fill_(1)))
    kept.clear()
    rss = peak_rss_bytes(lambda: kept.append(torch.empty(n, v, dtype=dtype).fill_(1)))
    kept.clear()
    # An op that needs a temporary: exp() then sum -> two N x V at the peak, none kept.
    x = torch.ones(n, v, dtype=dtype)
    alloc2 = peak_alloc_bytes(lambda: (x.exp() + 1).sum())
    rss2 = peak_rss_bytes(lambda: (x.exp() + 1).sum())
    del x
    return {
        "unit_bytes": unit,
        "one_kept_alloc": alloc / unit,
        "one_kept_rss": None if rss is None else rss / unit,
        "two_temp_alloc": alloc2 / unit,
        "two_temp_rss": None if rss2 is None else rss2 / unit,
    }


_FRESH_WRITE_SCRIPT = """
import sys, time, torch
nbytes, rounds = int(sys.argv[1]), int(sys.argv[2])
n = nbytes // 4
times = []
for _ in range(rounds + 2):
    t0 = time.perf_counter()
    torch.empty(n, dtype=torch.float32).fill_(1.0)
    times.append(time.perf_counter() - t0)
times = sorted(times[2:])
print(times[0], times[len(times) // 2])
"""


def fresh_write_probe_subprocess(nbytes: int, rounds: int, env: Dict[str, str]) -> Dict[str, object]:
    """Best and median time of ``torch.empty(n).fill_(1)`` in a fresh process with ``env`` set."""
    full_env = dict(os.environ, **env)
    try:
        out = subprocess.run(
            [sys.executable, "-c", _FRESH_WRITE_SCRIPT, str(nbytes), str(rounds)],
            capture_output=True, text=True, timeout=300, env=full_env,
        )
        best, median = (float(x) for x in out.stdout.split()[-2:])
    except Exception as exc:  # noqa: BLE001
        return {"env": env, "bytes": nbytes, "error": f"{type(exc).__name__}: {exc}"}
    return {"env": env, "bytes": nbytes, "min": best, "median": median, "rounds": rounds}


# ----------------------------------------------------------------------------------------------
# Timing helpers
# ----------------------------------------------------------------------------------------------


@dataclass
class Budget:
    """How long to time each benchmark: rounds = clamp(seconds / one call, min, max)."""

    seconds: float
    min_rounds: int
    max_rounds: int
    copy_mib: int  # size of each buffer in the copy-bandwidth probe
    copy_rounds: int

    def rounds(self, one_call_s: float) -> int:
        if one_call_s <= 0:
            return self.max_rounds
        return int(min(self.max_rounds, max(self.min_rounds, math.ceil(self.seconds / one_call_s))))


FULL_BUDGET = Budget(seconds=3.0, min_rounds=5, max_rounds=50, copy_mib=512, copy_rounds=15)
QUICK_BUDGET = Budget(seconds=0.05, min_rounds=3, max_rounds=5, copy_mib=16, copy_rounds=5)


def time_once(fn: Callable[[], object], setup: Optional[Callable[[], object]] = None, device: str = "cpu") -> float:
    args = setup() if setup else None
    t0 = time.perf_counter()
    fn(*args[0]) if args else fn()
    sync(device)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# Machine description
# ----------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> List[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [x for x in ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16") if x in flags]
    except OSError:
        pass
    return []


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _fastkd_info() -> Dict[str, Optional[str]]:
    try:
        import fastkd
        from fastkd import _ext

        isa = None
        if _ext.LOAD_ERROR is None:
            try:  # the instruction set the CPU kernels chose at run time, where the op exists
                isa = str(torch.ops.fastkd.cpu_isa())
            except Exception:  # noqa: BLE001
                isa = None
        return {
            "version": getattr(fastkd, "__version__", "?"),
            "path": os.path.dirname(fastkd.__file__),
            "extension": "loaded" if _ext.LOAD_ERROR is None else _ext.LOAD_ERROR,
            "cpu_isa": isa,
        }
    except Exception as exc:  # noqa: BLE001
        return {"version": None, "path": None, "extension": f"import fastkd failed: {exc}"}


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=os.path.dirname(__file__))
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_info() -> Dict[str, object]:
    mem_total = None
    status = _read("/proc/meminfo")
    if status:
        for line in status.splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    thp = _read("/sys/kernel/mm/transparent_hugepage/enabled")
    return {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "cpus_usable": affinity,
        "mem_total_bytes": mem_total,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_parallel": torch.__config__.parallel_info().splitlines()[-1].strip(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "thp": thp,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "fastkd": _fastkd_info(),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain")),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "env": {k: os.environ[k] for k in (
            "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
            "THP_MEM_ALLOC_ENABLE", "FASTKD_BACKEND",
        ) if k in os.environ},
    }


@dataclass
class RunNotes:
    """What a run learns besides timings; conftest writes it into the pytest-benchmark JSON."""

    quick: bool = False
    cases: List[str] = field(default_factory=list)
    providers: List[str] = field(default_factory=list)
    unavailable: Dict[str, str] = field(default_factory=dict)  # "case|provider|pass" -> reason
    machine_start: Dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, object]:
        return {
            "quick": self.quick,
            "cases": self.cases,
            "providers": self.providers,
            "unavailable": self.unavailable,
            "machine": self.machine_start,
            "loadavg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        }


NOTES = RunNotes()
