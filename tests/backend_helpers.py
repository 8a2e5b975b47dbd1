"""Which backends and instruction sets run here, as the tests of every family parametrize them:
one home for the skip rules (a backend that cannot run is skipped with its reason, never failed)."""

from __future__ import annotations

import os

import pytest
import torch

from fastkd import _ext

GPU = torch.cuda.is_available()
# Without a GPU, Triton kernels run in its interpreter on CPU tensors (set by conftest.py).
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
needs_ext = pytest.mark.skipif(_ext.LOAD_ERROR is not None, reason=str(_ext.LOAD_ERROR))
ISAS = ["avx512", "avx2", "scalar"]  # best first


def device_of(backend: str) -> str:
    """Triton runs on CPU tensors in its interpreter where there is no GPU."""
    return "cuda" if backend in ("triton", "cuda") and GPU else "cpu"


def backend_params(kernel: str, triton_error, names=("reference", "cpu", "triton", "cuda"), ids_prefix: str = "") -> list:
    """``names`` as pytest params of a ``backend`` argument, each skipped where it cannot run:
    cpu without the extension, triton where ``triton_error`` says why or there is neither a GPU
    nor the interpreter, cuda without a GPU or without ``kernel`` compiled for it."""
    cuda_runs = GPU and _ext.LOAD_ERROR is None and _ext.has_kernel(kernel, "CUDA")
    marks = {
        "reference": (),
        "cpu": needs_ext,
        "triton": pytest.mark.skipif(triton_error is not None or not (GPU or INTERPRETER), reason=triton_error or "no GPU, no interpreter"),
        "cuda": pytest.mark.skipif(not cuda_runs, reason="no GPU or no CUDA build"),
    }
    return [pytest.param(name, marks=marks[name], id=f"{ids_prefix}{name}") for name in names]


def float64_backends(params: list) -> list:
    """The params of ``backend_params`` that take float64 input: Triton computes in float32 and refuses it."""
    return [p for p in params if p.values[-1] != "triton"]


def triton_module_device(triton_error) -> str:
    """For a module of Triton tests: skips the whole module where the kernels cannot run, else
    the device they run on."""
    if triton_error is not None:
        pytest.skip(triton_error, allow_module_level=True)
    if not (GPU or INTERPRETER):
        pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)
    return device_of("triton")


def available_isas() -> list:
    """The instruction sets the cpu backend can run here, best first."""
    if _ext.LOAD_ERROR is not None:
        return []
    saved = os.environ.pop("FASTKD_CPU_ISA", None)
    try:
        best = torch.ops.fastkd.cpu_isa()
    finally:
        if saved is not None:
            os.environ["FASTKD_CPU_ISA"] = saved
    return ISAS[ISAS.index(best):]


def force_isa(monkeypatch, isa: str) -> None:
    """Runs the cpu kernels with ``isa`` for the rest of the test (FASTKD_CPU_ISA); skips the
    test where this CPU does not have it."""
    if isa not in available_isas():
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setenv("FASTKD_CPU_ISA", isa)
    assert torch.ops.fastkd.cpu_isa() == isa
