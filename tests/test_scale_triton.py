"""kernels/scale.py: the GPU backward's in-place scale by grad_output, skipped on the device when
grad_output is 1. Run here in Triton's interpreter on CPU tensors (the same kernel code); on a GPU
the fused ops' GPU tests (tests/test_*_gpu.py, with grad_output 1 and not 1) run it compiled."""

import math

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed")

from fastkd.kernels import scale as scale_kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n", [1, 63, 64, 65, 1000])
@pytest.mark.parametrize("s", [1.0, 0.5, -2.5, 0.0, math.inf, math.nan])
def test_scales_as_mul_or_leaves_untouched(dtype, n, s):
    torch.manual_seed(n)
    grad = torch.randn(n, dtype=torch.float32, device=DEVICE).mul_(3).to(dtype)
    grad[0] = float("nan")  # a NaN in the gradient stays NaN whatever the scale
    scale = torch.tensor(s, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=DEVICE)
    expected = grad.clone().mul_(scale)
    if dtype == torch.bfloat16 and DEVICE == "cpu" and s != 1.0:
        # Triton's interpreter rounds float32 to bfloat16 toward zero (a compiled kernel, like
        # torch, to nearest even): expect the float32 product truncated to bfloat16's 16 bits.
        product = (grad.float() * scale).view(torch.int32)
        expected = (product & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
    before = grad.clone()
    out = scale_kernels.scale_unless_one_(grad, scale)
    assert out.data_ptr() == grad.data_ptr(), "must scale in place"
    if s == 1.0:
        # Untouched, bit for bit (the kernel never wrote it).
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
        assert torch.equal(grad.view(bits), before.view(bits))
    torch.testing.assert_close(grad, expected, rtol=0, atol=0, equal_nan=True)


def test_multidimensional_and_empty():
    grad = torch.randn(3, 5, 7, device=DEVICE)
    expected = grad * 0.25
    scale_kernels.scale_unless_one_(grad, torch.tensor(0.25, device=DEVICE))
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    empty = torch.empty(0, 9, device=DEVICE)
    assert scale_kernels.scale_unless_one_(empty, torch.tensor(2.0, device=DEVICE)) is empty


def test_a_one_element_scale_of_another_shape():
    # autograd hands a scalar loss's grad_output as a 0-dim tensor; a [1] one scales alike.
    grad = torch.ones(10, device=DEVICE)
    scale_kernels.scale_unless_one_(grad, torch.tensor([3.0], device=DEVICE))
    assert torch.equal(grad, torch.full((10,), 3.0, device=DEVICE))
