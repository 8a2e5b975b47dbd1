"""Triton is importable and runs here: on a GPU, or in its interpreter on CPU tensors.

The Triton test modules (tests/test_*_triton.py) skip themselves when Triton cannot run, which
would turn a broken Triton install into a green suite. This module does not skip: it fails
instead, naming what is missing."""

import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_triton_imports_and_a_kernel_runs():
    assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1", (
        "no CUDA device and TRITON_INTERPRET is not 1 (tests/conftest.py sets it): the Triton tests would all skip"
    )
    import triton
    import triton.language as tl

    @triton.jit
    def axpy(x_ptr, y_ptr, out_ptr, a, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(out_ptr + offs, a * tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask)

    x = torch.arange(100, dtype=torch.float32, device=DEVICE)
    y = torch.full((100,), 0.5, device=DEVICE)
    out = torch.full((100,), float("nan"), device=DEVICE)
    axpy[(triton.cdiv(100, 32),)](x, y, out, 3.0, 100, BLOCK=32)
    assert torch.equal(out, 3.0 * x + 0.5)


def test_every_triton_backend_registered():
    """Every op's Triton kernel imported and registered (its error is None)."""
    from fastkd.ops import table

    errors = {op.name: op.kernel.triton_error for op in table.all_ops()}
    assert {name: err for name, err in errors.items() if err is not None} == {}
