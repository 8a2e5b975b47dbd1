"""What the benchmarks measure, and with what: ops, cases, providers, probes.

Everything here is plain Python with no pytest in it, so that ``bench/test_bench_<op>.py`` (the
timed runs), ``bench/conftest.py`` (selection) and ``bench/report.py`` (BENCHMARKS.md) share one
description of the suite.

Extending the suite
-------------------
* A new op: a file ``bench/test_bench_<op>.py`` that :func:`register`-s an :class:`Op` (its
  composite, i.e. what users write today in PyTorch, its fused fastkd call, its inputs, and how
  many ``[N, V]`` tensors a fused pass must move) with its full and quick :class:`Case` lists, and
  holds one test, ``def test_<op>(benchmark, bench_item, budget): run_case(benchmark, bench_item,
  budget)``, with ``BENCH_OPS = ("<op>",)`` at module level (conftest.py parametrizes it with the
  cases of those ops). Mark one case per op ``headline=True, targets=STANDARD_TARGETS``. A loss
  over ``[N, V]`` logits registers with :func:`register_logits` (the logit family's sizes); one
  that streams a student and a teacher of one unit each takes :func:`stream_traffic`.
* A new provider (a fastkd backend, another library): append a :class:`Provider` to
  ``PROVIDERS``. ``check`` returns ``None`` when it can run a case, else the reason it cannot;
  such a provider is reported as unavailable, never crashed on. The fastkd ``triton`` and
  ``cuda`` backends are already listed: they run on CUDA tensors, and CUDA cases are selected
  only where a CUDA device exists (``--bench-devices``). A provider that implements only some
  ops (a peer library) names them in ``ops``; a peer library is also listed in ``PEERS`` so that
  a run says in one line when it is not compared.
* Sizes: ``register``'s ``full`` list is what ``make bench`` (BENCHMARKS.md) measures, ``quick``
  the tiny smoke-test shapes, and ``sweep`` (made with :func:`sweep`) the size sweep ``fastkd
  bench`` runs by default. ``fastkd bench --quick`` measures each op's headline case, on CPU at
  ``cpu_quick_size`` where one is given (a smaller N, for the ops whose composites take seconds a
  call on 2 cores), so that the whole suite stays within 5 minutes.
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
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

PASSES = ("fwd", "bwd", "fwdbwd")
PASS_TITLES = {"fwd": "forward", "bwd": "backward", "fwdbwd": "forward+backward"}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------
# Ops: one per public fused loss, each registered by its own ``bench/test_bench_<op>.py``.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One op's benchmark: what users write today, the fastkd call, the inputs, the traffic.

    ``inputs(case)`` returns the call's tensors, the student logits first (it becomes the leaf
    that requires grad); ``composite(*inputs, **params)`` and ``fused(*inputs, backend=...,
    **params)`` return the loss. ``traffic(case)`` gives, per pass, the bytes a fused
    implementation must move (reads + writes) in units of one N×V tensor of the student dtype.
    """

    name: str
    title: str
    composite: Callable[..., torch.Tensor]
    fused: Callable[..., torch.Tensor]
    traffic: Callable[["Case"], Dict[str, float]]
    traffic_note: str
    composite_text: str  # the composite, as the report shows it
    inputs: Callable[["Case"], Tuple[torch.Tensor, ...]] = None  # default: logits_pair
    # The op's case at another N x V (``--bench-shapes``), when its params depend on the size.
    resize: Optional[Callable[["Case", int, int], "Case"]] = None
    # A fused head's GEMMs alone (a function of the inputs, like ``composite``, computing no
    # loss): the time bound of the ``gemms`` provider, as the traffic bound is of a logit loss.
    gemms: Optional[Callable[..., torch.Tensor]] = None

    def make_inputs(self, case: "Case") -> Tuple[torch.Tensor, ...]:
        return (self.inputs or logits_pair)(case)

    def at_size(self, case: "Case", n: int, v: int) -> "Case":
        return self.resize(case, n, v) if self.resize else case.with_size(n, v)


OPS: Dict[str, Op] = {}
FULL_CASES: List["Case"] = []
QUICK_CASES: List["Case"] = []
SWEEP_CASES: List["Case"] = []
CPU_QUICK_SIZES: Dict[str, Tuple[int, int]] = {}


def register(
    op: Op, full: List["Case"], quick: List["Case"], sweep: Optional[List["Case"]] = None,
    cpu_quick_size: Optional[Tuple[int, int]] = None,
) -> Op:
    """Adds an op and its cases (full run: sized so the whole suite stays within ~15 minutes on 2
    cores; quick: tiny shapes, seconds; sweep: a few sizes along one dimension, see
    :func:`sweep`; cpu_quick_size: the size ``fastkd bench --quick`` measures the headline case at
    on CPU, if not its own) to the suite."""
    OPS[op.name] = op
    FULL_CASES.extend(full)
    QUICK_CASES.extend(quick)
    SWEEP_CASES.extend(sweep or [])
    if cpu_quick_size is not None:
        CPU_QUICK_SIZES[op.name] = cpu_quick_size
    return op


def sweep(base: "Case", sizes: List[Tuple[int, int]], fused_only_from: Optional[int] = None) -> List["Case"]:
    """``base`` (an op's headline case: its dtype and params) at each ``(n, v)`` of ``sizes``, the
    points of a time-against-size curve. From the ``fused_only_from``-th size on, only fastkd's
    providers run (the composite would exhaust memory there)."""
    out = []
    for i, (n, v) in enumerate(sizes):
        only = FASTKD_PROVIDERS if fused_only_from is not None and i >= fused_only_from else ()
        out.append(Case(base.op, n, v, base.dtype, base.params, False, base.device, (), only, base.devices))
    return out


# The logit family's sweep: V from 4k to 128k at N = 512 (its largest point moves as many bytes as
# the 2048 x 32000 headline case).
LOGIT_SWEEP = [(512, 4096), (512, 16384), (512, 65536), (512, 131072)]
# ... and its size for `fastkd bench --quick` on CPU: N = 256 at the headline's V = 32000 (one
# N x V tensor, 31 MiB; a pass moves 3-6 of them, beyond the caches), an eighth of the headline's time.
LOGIT_CPU_QUICK = (256, 32000)


def register_logits(op: Op, head: "Case", quick: List["Case"], more: List["Case"] = ()) -> Op:
    """:func:`register` for a loss over ``[N, V]`` logits, at the logit family's sizes: its
    headline case ``head`` (then ``more``) in the full run, ``head`` along LOGIT_SWEEP, and at
    LOGIT_CPU_QUICK on CPU for ``fastkd bench --quick``."""
    return register(op, full=[head, *more], quick=quick, sweep=sweep(head, LOGIT_SWEEP), cpu_quick_size=LOGIT_CPU_QUICK)


def stream_traffic(case: "Case") -> Dict[str, float]:
    """The traffic of a loss whose fused pass streams a student and a teacher of one N×V unit
    each: the forward reads both (2), forward+backward also writes the gradient (3), the backward
    alone reads the gradient the forward saved and writes it scaled by grad_output (2)."""
    return {"fwd": 2, "bwd": 2, "fwdbwd": 3}


def parse_shape(text: str) -> Tuple[int, int]:
    """``"2048x32000"`` (or ``×``, ``X``) -> (2048, 32000); ValueError naming the problem."""
    parts = text.strip().lower().replace("×", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"malformed shape {text.strip()!r} (expected NxV, two positive integers, e.g. 2048x32000)")
    return int(parts[0]), int(parts[1])


def headline_cases() -> List["Case"]:
    """Each op's headline case of the full list: one shape per op."""
    return [c for c in FULL_CASES if c.headline]


def short_case(head: "Case") -> "Case":
    """What ``fastkd bench --quick`` measures for a headline case on its device: the case itself,
    or on CPU at the op's ``cpu_quick_size`` (then without the headline's targets)."""
    if head.device != "cpu" or head.op not in CPU_QUICK_SIZES:
        return head
    return head.with_size(*CPU_QUICK_SIZES[head.op])


def logits_pair(case: "Case") -> Tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits ~ N(0, 2²) in the case's dtype."""
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(case.n, case.v, generator=g) * 2.0).to(case.torch_dtype)
    t = (torch.randn(case.n, case.v, generator=g) * 2.0).to(case.torch_dtype)
    return s, t


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------

# The targets every op's headline case is held to, forward+backward, cpu backend:
# (provider, metric, comparison, threshold, label).
STANDARD_TARGETS: Tuple[Tuple[str, str, str, float, str], ...] = (
    ("fastkd-cpu", "speedup_compile", ">=", 3.0, "≥ 3× faster than torch.compile"),
    ("fastkd-cpu", "speedup_eager", ">=", 10.0, "≥ 10× faster than eager"),
    ("fastkd-cpu", "pct_bound", ">=", 50.0, "≥ 50 % of the memory-traffic bound"),
    ("fastkd-cpu", "peak_units", "<=", 1.1, "≤ 1.1 × one N×V tensor of extra memory"),
)


def _fmt_param(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


@dataclass(frozen=True)
class Case:
    op: str
    n: int
    v: int
    dtype: str  # key of DTYPES
    params: Tuple[Tuple[str, object], ...] = (("temperature", 2.0),)
    headline: bool = False
    device: str = "cpu"
    # Targets this case is held to (see STANDARD_TARGETS); empty: none.
    targets: Tuple[Tuple[str, str, str, float, str], ...] = ()
    # Providers that may run it (empty: all): a composite that would exhaust memory is left out.
    only: Tuple[str, ...] = ()
    # The devices it is measured on (empty: every device of the run): a shape sized for a GPU
    # (or for a CPU) names its device.
    devices: Tuple[str, ...] = ()

    def runs_on(self, device: str) -> bool:
        return not self.devices or device in self.devices

    @property
    def name(self) -> str:
        extra = "-".join(f"{k[0].upper()}{_fmt_param(v)}" if isinstance(v, (int, float)) else _fmt_param(v) for k, v in self.params)
        return f"{self.op}-{self.dtype}-{self.n}x{self.v}-{extra}-{self.device}"

    @property
    def title(self) -> str:
        extra = ", ".join(f"{k}={_fmt_param(v)}" for k, v in self.params)
        return f"{self.op} · {self.dtype} · N={self.n} · V={self.v} · {extra} · {self.device}"

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

    def kwargs(self) -> Dict[str, object]:
        return dict(self.params)

    def with_device(self, device: str) -> "Case":
        return replace(self, device=device)

    def with_size(self, n: int, v: int) -> "Case":
        return replace(self, n=n, v=v, headline=False, targets=(), only=())

    def with_dtype(self, dtype: str) -> "Case":
        if dtype == self.dtype:
            return self
        # Targets are set for the registered dtype; another dtype is measured without them.
        return replace(self, dtype=dtype, targets=())


# ----------------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Provider:
    name: str
    title: str
    devices: Tuple[str, ...]
    build: Callable[[Op, Case], Callable[..., torch.Tensor]]
    check: Callable[[Op, Case], Optional[str]] = lambda op, case: None
    is_baseline: bool = False
    ops: Optional[Tuple[str, ...]] = None  # the ops it implements (None: all)
    is_bound: bool = False  # computes no loss (a time bound): its answer is not checked


def _build_eager(op: Op, case: Case):
    kw = case.kwargs()
    return lambda *xs: op.composite(*xs, **kw)


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

        def composite(*xs):
            return op.composite(*xs, **kw)

        _COMPILED[key] = torch.compile(composite, dynamic=False)
    return _COMPILED[key]


def _build_gemms(op: Op, case: Case):
    kw = case.kwargs()
    return lambda *xs: op.gemms(*xs, **kw)


def _check_gemms(op: Op, case: Case) -> Optional[str]:
    return None if op.gemms is not None else f"{op.name} has no GEMMs of its own"


def _check_compile(op: Op, case: Case) -> Optional[str]:
    if case.device == "cpu":
        import shutil

        if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
            return "torch.compile needs a C++ compiler on CPU and none was found"
    return None


@functools.lru_cache(maxsize=None)
def _fastkd_probe(op_name: str, backend: str, case: Case) -> Optional[str]:
    """None when the op runs forward and backward on a small input of this case's kind with this
    backend, else the reason (the exception's first line)."""
    try:
        import fastkd  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure is a reason to report
        return f"import fastkd failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    op = OPS[op_name]
    try:
        small = case.with_size(4, 257)
        xs = [x.detach().to(case.device).requires_grad_(x.requires_grad or i == 0) for i, x in enumerate(op.make_inputs(small))]
        op.fused(*xs, backend=backend, **small.kwargs()).backward()
        if xs[0].grad is None or not bool(torch.isfinite(xs[0].grad).all()):
            return "ran, but produced no finite gradient on a small input"
    except Exception as exc:  # noqa: BLE001
        msg = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {msg[0] if msg else ''}"
    return None


def _fastkd_provider(backend: str, devices: Tuple[str, ...]) -> Provider:
    def build(op: Op, case: Case):
        kw = case.kwargs()
        return lambda *xs: op.fused(*xs, backend=backend, **kw)

    def check(op: Op, case: Case) -> Optional[str]:
        if case.device not in devices:
            return f"fastkd backend {backend!r} runs on {'/'.join(devices)} tensors"
        return _fastkd_probe(op.name, backend, case)

    return Provider(f"fastkd-{backend}", f"fastkd `backend=\"{backend}\"`", devices, build, check)


# ----------------------------------------------------------------------------------------------
# Peer libraries
# ----------------------------------------------------------------------------------------------

# Liger-Kernel (linkedin/Liger-Kernel): Triton kernels for the divergence itself; the
# log-softmaxes stay in PyTorch, as a user of Liger writes it. Each call follows the composite's
# conventions (batchmean over rows, times T²), so the run's sanity check against the float32
# composite flags (⚠) any mismatch of convention.


def _liger_call(op_name: str, kw: Dict[str, object]):
    import liger_kernel.transformers as lk

    T = float(kw["temperature"])
    if op_name == "kd":
        kl = lk.LigerKLDIVLoss(reduction="batchmean", log_target=True)
        return lambda s, t: kl(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)) * T * T
    if op_name in ("kd_jsd", "kd_reverse_kl"):
        # Liger's generalized JSD: beta weights KL(teacher || mixture), as TRL's and kd_loss's;
        # beta = 1 is the reverse KL.
        jsd = lk.LigerJSD(beta=float(kw.get("beta", 1.0)) if op_name == "kd_jsd" else 1.0)
        return lambda s, t: jsd(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)) * T * T
    if op_name == "kd_tvd":
        tvd = lk.LigerTVDLoss(reduction="batchmean")
        return lambda s, t: tvd(F.softmax(s / T, -1), F.softmax(t / T, -1)) * T * T
    if op_name == "fused_linear_kd":
        # jsd_beta = 0 is the forward KL(teacher || student), logits never materialised.
        fl = lk.LigerFusedLinearJSD(jsd_beta=0.0, temperature=T)
        return lambda h_s, w_s, h_t, w_t: fl(h_s, w_s, h_t, w_t, None) * T * T
    raise NotImplementedError(f"Liger-Kernel has no kernel for {op_name}")


LIGER_OPS = ("kd", "kd_reverse_kl", "kd_jsd", "kd_tvd", "fused_linear_kd")


@functools.lru_cache(maxsize=None)
def liger_unavailable() -> Optional[str]:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure is a reason to report
        first = str(exc).strip().splitlines()
        return f"not importable ({type(exc).__name__}: {first[0] if first else ''}; pip install liger-kernel)"
    return None


def _check_liger(op: Op, case: Case) -> Optional[str]:
    if case.device != "cuda":
        return "Liger-Kernel runs on CUDA tensors only"
    return liger_unavailable()


def _build_liger(op: Op, case: Case):
    return _liger_call(op.name, case.kwargs())


def _distribution_version(name: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# name -> (what it is, its distribution, the ops it covers, the devices it runs on, why it cannot
# be compared here)
PEERS: Dict[str, Tuple[str, str, Tuple[str, ...], Tuple[str, ...], Callable[[], Optional[str]]]] = {
    "liger": ("Liger-Kernel", "liger-kernel", LIGER_OPS, ("cuda",), liger_unavailable),
}


def peer_status(devices: List[str]) -> Dict[str, Dict[str, object]]:
    """For each peer library: whether it is compared in a run on ``devices``, and if not, one line
    saying why (not importable, or no device it runs on)."""
    out = {}
    for name, (title, distribution, ops, on, unavailable) in PEERS.items():
        reasons = []
        why = unavailable()
        if why:
            reasons.append(why)
        if not set(on) & set(devices):
            reasons.append(f"it runs on {'/'.join(on)} and this run is on {'/'.join(devices)}")
        version = None if why else _distribution_version(distribution)
        named = f"{title} {version}" if version else title
        out[name] = {
            "title": title, "version": version, "ops": list(ops), "devices": list(on), "compared": not reasons,
            "line": f"{named} ({', '.join(ops)}): " + ("compared (provider `%s`)" % name if not reasons
                                                      else "not compared: " + "; ".join(reasons)),
        }
    return out


PROVIDERS: List[Provider] = [
    Provider("eager", "eager composite (PyTorch)", ("cpu", "cuda"), _build_eager, is_baseline=True),
    Provider("compile", "torch.compile(composite)", ("cpu", "cuda"), _build_compile, _check_compile, is_baseline=True),
    _fastkd_provider("cpu", ("cpu",)),
    _fastkd_provider("triton", ("cuda",)),
    _fastkd_provider("cuda", ("cuda",)),
    Provider("liger", "Liger-Kernel (its divergence kernel after PyTorch's log-softmax; fused linear JSD with beta=0)",
             ("cuda",), _build_liger, _check_liger, ops=LIGER_OPS),
    Provider("gemms", "the bare GEMMs alone (no loss): a fused head's time bound", ("cpu", "cuda"), _build_gemms, _check_gemms,
             ops=("fused_linear_kd", "fused_linear_sparse_kd"), is_bound=True),
]
PROVIDER_BY_NAME = {p.name: p for p in PROVIDERS}
BASELINES = ("eager", "compile")
FASTKD_PROVIDERS = tuple(p.name for p in PROVIDERS if p.name.startswith("fastkd-"))


def runs(provider: Provider, case: Case) -> bool:
    """Whether ``provider`` is offered ``case`` at all (device, the ops it implements, Case.only)."""
    return (
        case.device in provider.devices
        and (provider.ops is None or case.op in provider.ops)
        and (not case.only or provider.name in case.only)
    )


# A test-only hook: FASTKD_BENCH_FAIL="provider[:op],..." makes that provider raise when it is
# built for that op (every op if none is given), to check that a failing provider is reported
# and the run goes on. Never set outside tests.
FAIL_ENV = "FASTKD_BENCH_FAIL"


def injected_failure(provider: Provider, case: Case) -> None:
    for item in filter(None, (x.strip() for x in os.environ.get(FAIL_ENV, "").split(","))):
        name, _, op = item.partition(":")
        if name == provider.name and (not op or op == case.op):
            raise RuntimeError(f"failure injected by {FAIL_ENV}={os.environ[FAIL_ENV]}")


def available_devices() -> List[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


_INPUTS: Dict[str, Tuple[torch.Tensor, ...]] = {}
_REFERENCE: Dict[str, Tuple[float, torch.Tensor]] = {}


def inputs(case: Case) -> Tuple[torch.Tensor, ...]:
    """The case's tensors on its device, the student a leaf that requires grad; kept for the
    case's tests (one case's inputs at a time)."""
    if case.name not in _INPUTS:
        _INPUTS.clear()
        _REFERENCE.clear()
        gc.collect()
        made = OPS[case.op].make_inputs(case)
        xs = [x.detach().to(case.device).requires_grad_(x.requires_grad or i == 0) for i, x in enumerate(made)]
        _INPUTS[case.name] = tuple(xs)
    return _INPUTS[case.name]


def reference(case: Case) -> Tuple[float, torch.Tensor]:
    """Loss and student gradient of the composite in float32 on the same inputs."""
    if case.name not in _REFERENCE:
        xs = [x.detach().float() if x.is_floating_point() else x for x in inputs(case)]
        xs[0].requires_grad_(True)
        loss = OPS[case.op].composite(*xs, **case.kwargs())
        loss.backward()
        _REFERENCE[case.name] = (float(loss.detach()), xs[0].grad)
    return _REFERENCE[case.name]


def compare(case: Case, loss: torch.Tensor, grad: Optional[torch.Tensor]) -> Dict[str, float]:
    if case.only and "eager" not in case.only:
        # The case leaves the composite out (it would exhaust memory): no reference to compare with.
        return {"skipped": "the composite does not run at this size (Case.only)"}
    ref_loss, ref_grad = reference(case)
    out = {"loss_rel_err": abs(float(loss) - ref_loss) / max(abs(ref_loss), 1e-30)}
    if grad is not None:
        out["grad_rel_err"] = float((grad.float() - ref_grad).abs().max() / ref_grad.abs().max().clamp_min(1e-30))
    return out


# Flag (not fail) a provider whose answer is further than this from the float32 composite.
CHECK_TOL = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 1e-2}
# ... unless, against the float64 composite, it is within this many times the float32
# composite's own error (FlashAttention's rule): where the float32 composite is itself far from
# the exact answer (TVD's gradient, sign(p - q), flips on entries where p and q round alike), a
# provider differing from it is not wrong.
CHECK_FP64_FACTOR = 2.0


def arbitrate(case: Case, loss: torch.Tensor, grad: Optional[torch.Tensor], check: Dict) -> Dict:
    """For a check beyond tolerance: errors of the provider and of the float32 composite against
    the float64 composite, and whether the provider is within CHECK_FP64_FACTOR of the latter."""
    xs = [x.detach().double() if x.is_floating_point() else x for x in inputs(case)]
    xs[0].requires_grad_(True)
    exact = OPS[case.op].composite(*xs, **case.kwargs())
    exact.backward()
    exact_loss, exact_grad = float(exact.detach()), xs[0].grad
    del xs, exact
    ref_loss, ref_grad = reference(case)

    def errs(l, g):
        out = {"loss": abs(float(l) - exact_loss) / max(abs(exact_loss), 1e-300)}
        if g is not None:
            out["grad"] = float((g.double() - exact_grad).abs().max() / exact_grad.abs().max().clamp_min(1e-300))
        return out

    mine, theirs = errs(loss, grad), errs(ref_loss, ref_grad)
    tol = check["tol"]
    ok = all(mine[k] <= max(tol, CHECK_FP64_FACTOR * theirs[k]) for k in mine)
    return dict(check, fp64_loss_rel_err=mine["loss"], fp64_grad_rel_err=mine.get("grad"),
                composite_fp64_loss_rel_err=theirs["loss"], composite_fp64_grad_rel_err=theirs.get("grad"),
                ok=ok, arbitrated=True)


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


# At least 3 rounds: the slowest full cases (fused_linear_kd's eager composite, rkd_angle's
# [B, B, D] composite) take 10-20 s a call on 2 cores, and their ratios are far from any target.
FULL_BUDGET = Budget(seconds=3.0, min_rounds=3, max_rounds=50, copy_mib=512, copy_rounds=15)
QUICK_BUDGET = Budget(seconds=0.05, min_rounds=3, max_rounds=5, copy_mib=16, copy_rounds=5)
# `fastkd bench --quick`: real shapes, few rounds (the copy probe keeps a buffer far larger than
# the caches, so that the traffic bound stays meaningful).
SHORT_BUDGET = Budget(seconds=0.5, min_rounds=3, max_rounds=10, copy_mib=512, copy_rounds=5)
BUDGETS = {"full": FULL_BUDGET, "short": SHORT_BUDGET, "tiny": QUICK_BUDGET}


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
    failed: Dict[str, str] = field(default_factory=dict)  # "case|provider|pass" -> one-line reason
    case_info: Dict[str, Dict[str, object]] = field(default_factory=dict)  # case name -> case_info()
    machine_start: Dict[str, object] = field(default_factory=dict)
    selection: Dict[str, object] = field(default_factory=dict)  # which cases and budget
    peers: Dict[str, Dict[str, object]] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, object]:
        return {
            "quick": self.quick,
            "cases": self.cases,
            "providers": self.providers,
            "unavailable": self.unavailable,
            "failed": self.failed,
            "case_info": self.case_info,
            "selection": self.selection,
            "peers": self.peers,
            "machine": self.machine_start,
            "loadavg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        }


def case_info(case: Case) -> Dict[str, object]:
    """What a report needs to know of a case, also when nothing could be measured on it."""
    return {
        "op": case.op, "case": case.name, "title": case.title, "headline": case.headline, "n": case.n,
        "v": case.v, "dtype": case.dtype, "device": case.device, "params": case.kwargs(), "unit_bytes": case.unit_bytes,
    }


NOTES = RunNotes()
# The cases this run measures (conftest.py sets it), for the probes that size themselves on them.
SELECTED_CASES: List[Case] = []
