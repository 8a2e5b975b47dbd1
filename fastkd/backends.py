"""Backend choice, shared by every op family.

A backend states whether it can run a given call and, when it cannot, why (in the manner of
xformers' operator dispatch). The choice comes from, in order: the ``backend=`` argument, the
``FASTKD_BACKEND`` environment variable, then the tensors' device. A backend that was asked for
explicitly and cannot run raises an error giving its reason; an automatic choice falls back to
the next candidate and logs why the better one was passed over.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Mapping, Optional, Sequence

import torch

log = logging.getLogger("fastkd")

BACKENDS = ("reference", "cpu", "triton", "cuda")

# Fastest first. On CUDA tensors the CUDA C++ kernels come before Triton: on the one GPU measured
# (an H200, BENCHMARKS.md "Measured on a GPU") they were faster for every op, and they
# need no JIT compilation on first use.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}

# A backend's check returns None when it can run the call, else the reason it cannot.
Check = Callable[..., Optional[str]]

_logged: set = set()


def requested_backend(backend: Optional[str]) -> Optional[str]:
    """The backend named by the argument or, failing that, by ``FASTKD_BACKEND``."""
    name = backend if backend is not None else (os.environ.get("FASTKD_BACKEND") or None)
    if name is None:
        return None
    if not isinstance(name, str) or name not in BACKENDS:
        source = "backend" if backend is not None else "FASTKD_BACKEND"
        raise ValueError(f"{source}={name!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    return name


def choose(op: str, checks: Mapping[str, Check], device: torch.device, backend: Optional[str], *args) -> str:
    """Pick the backend that runs ``op`` on ``device``.

    ``checks`` maps each backend name to its check, called with ``*args``.
    """
    name = requested_backend(backend)
    if name is not None:
        reason = checks[name](*args)
        if reason is not None:
            raise RuntimeError(f"fastkd.{op}: backend {name!r} cannot run this call: {reason}")
        return name
    candidates: Sequence[str] = AUTO_ORDER.get(device.type, ("reference",))
    reasons = []
    for cand in candidates:
        reason = checks[cand](*args)
        if reason is None:
            if reasons:
                key = (op, device.type, tuple(reasons))
                if key not in _logged:
                    _logged.add(key)
                    log.warning("fastkd.%s: using backend %r (%s)", op, cand, "; ".join(reasons))
            return cand
        reasons.append(f"{cand}: {reason}")
    raise RuntimeError(f"fastkd.{op}: no backend can run this call: " + "; ".join(reasons))


def fused_checks(op: str, triton_error: Optional[str]) -> dict:
    """The four backends' checks for a fused op whose C++ kernels are ``fastkd::<op>`` and whose
    Triton kernel is ``fastkd::<op>_triton`` (``triton_error``: why that one is unavailable).
    Each check takes the call's tensors, the student first."""
    from fastkd import _ext  # the extension registers ops on import; backends must not need it

    # Asked once, here: the registrations are fixed once the extension is imported, and the
    # dispatcher query is not something torch.compile can trace.
    has_cpu, has_cuda = _ext.has_kernel(op, "CPU"), _ext.has_kernel(op, "CUDA")

    def reference(*tensors):
        return None

    def extension(device: str, kernel_missing: Optional[str]) -> Check:
        """The check of the C++ kernel for ``device``; ``kernel_missing``: why it is not there."""

        def check(student, *tensors):
            if student.device.type != device:
                return f"it runs on {device.upper()} tensors, got a {student.device.type} tensor"
            if _ext.LOAD_ERROR is not None:
                return _ext.LOAD_ERROR
            return kernel_missing

        return check

    cpu = extension("cpu", None if has_cpu else f"the extension has no CPU kernel for fastkd::{op}")
    cuda = extension("cuda", None if has_cuda else "the extension was built without CUDA (nvcc missing, or FASTKD_NO_CUDA=1)")

    def triton(student, *tensors):
        if triton_error is not None:
            return triton_error
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in (student,) + tensors):
            return "its kernel computes in float32; float64 input runs on the cuda, cpu or reference backend"
        if student.device.type == "cuda":
            return None
        if student.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return f"it runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1), got a {student.device.type} tensor"

    return {"reference": reference, "cpu": cpu, "cuda": cuda, "triton": triton}
