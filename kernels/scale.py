"""The backward of every fused loss of a float32 or float64 student on a GPU: scale the saved
gradient by grad_output, in place, unless grad_output is exactly 1. (A 16-bit gradient is not
scaled after its rounding, which would round it twice: the op's own kernel rewrites it with
grad_output folded in, skipping rows whose grad_output is 1 the same way; fastkd/ops/fused_autograd.py.)

    grad[i] *= s   where s = *scale_ptr (a 0-dim tensor on the device), skipped when s == 1

A fused op's forward already wrote d loss / d student; its backward only multiplies by the scalar
grad_output. For the common ``loss.backward()`` that scalar is 1 and the multiply is a full read
and write of the gradient for nothing (2 N·V of traffic beside the forward's 3 N·V: measured on an
H200, kd's backward took 0.32 ms against its fused forward's 0.19 ms). Reading the scalar on the
host to skip it would synchronise the device; instead every program reads it and returns at once
when it is 1, so the skip costs one launch and no traffic. Any other value, NaN and infinities
included, multiplies as ``grad.mul_(scale)`` would (in float32, float64 for a float64 gradient).

Memory traffic: read 4 bytes per program when s == 1; else read and write the gradient once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Entries per program, and the warps that carry them (16 per thread: four 16-byte fp32 loads).
BLOCK = 4096
NUM_WARPS = 8
# Under the interpreter (CPU tensors), small blocks make the tests' small gradients span programs.
BLOCK_INTERPRETER = 64


@triton.jit
def _scale_unless_one_kernel(
    g_ptr,  # [n] the gradient, any float dtype, scaled in place
    scale_ptr,  # [] float32 (float64 for a float64 gradient): grad_output
    n,
    BLOCK: tl.constexpr,
):
    s = tl.load(scale_ptr)
    if s != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        tl.store(g_ptr + offs, (g * s).to(g_ptr.dtype.element_ty), mask=mask)


def scale_unless_one_(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``grad.mul_(scale)`` for a contiguous gradient and a 0-dim ``scale`` on its device, with no
    traffic when ``scale`` is 1 and no host synchronisation either way."""
    n = grad.numel()
    if n == 0:
        return grad
    block = BLOCK if grad.is_cuda else BLOCK_INTERPRETER
    scale = scale.to(torch.float64 if grad.dtype == torch.float64 else torch.float32).reshape(())
    _scale_unless_one_kernel[(triton.cdiv(n, block),)](grad, scale, n, BLOCK=block, num_warps=NUM_WARPS)
    return grad


def static_launches() -> list:
    """The launches scale_unless_one_ makes on a GPU (convention: kernels/__init__.py): its one
    block size, for each gradient dtype the fused ops produce, with a length that is a multiple
    of 16 and one that is not (Triton specialises on that)."""
    from . import StaticLaunch

    out = []
    for dtype, scale in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                         (torch.float16, torch.float32), (torch.float64, torch.float64)):
        size = torch.empty((), dtype=dtype).element_size()
        name = str(dtype).removeprefix("torch.")
        for n, variant in ((2048 * 32000, "n % 16 == 0"), (4097 * 31, "n % 16 != 0")):
            out.append(StaticLaunch(
                _scale_unless_one_kernel, dict(g_ptr=dtype, scale_ptr=scale, n=n, BLOCK=BLOCK), NUM_WARPS,
                f"{name} · BLOCK={BLOCK} · {NUM_WARPS} warps", variant, (2 * size, 0),
            ))
    return out
