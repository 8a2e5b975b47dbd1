"""dkd_loss's Triton kernel against the reference. Without a GPU it runs in Triton's interpreter
on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1), which is slow: shapes stay small,
but long enough (V > 256, the interpreter's block) that the blocked path runs, with targets in
the first, a middle and the last block. The contract tests of test_dkd.py (NaN, masked entries,
ignored rows, dominating targets, double backward, retained graph) also run on this backend."""

import math

import pytest
import torch

import fastkd
from fastkd.ops import dkd as dkd_ops
from backend_helpers import triton_module_device
from dkd_helpers import check_against_reference
from kd_helpers import make_labels, make_logits

DEVICE = triton_module_device(dkd_ops.TRITON_ERROR)
CASES = [
    # shape, dtype, reduction, temperature, alpha, beta
    ((3, 7), torch.float32, "batchmean", 1.0, 1.0, 8.0),
    ((5, 300), torch.float32, "none", 4.0, 1.0, 8.0),
    ((2, 1100), torch.float32, "sum", 2.0, 0.5, 2.0),
    ((2, 3, 257), torch.bfloat16, "batchmean", 4.0, 1.0, 8.0),
    ((4, 600), torch.float16, "none", 2.0, 2.0, 0.5),
    ((1, 2), torch.float32, "batchmean", 1.0, 1.0, 8.0),
]


@pytest.mark.parametrize("shape,dtype,reduction,temperature,alpha,beta", CASES)
def test_triton_matches_reference(shape, dtype, reduction, temperature, alpha, beta):
    s, t = make_logits(shape, dtype, device=DEVICE)
    rows = math.prod(shape[:-1])
    y = make_labels(shape[:-1], shape[-1], ignored=(0,) if rows > 2 else (), device=DEVICE)
    if shape[-1] > 512:  # a target in the first block and one in the last
        flat = y.view(-1)
        flat[-1], flat[-2] = 3, shape[-1] - 2
    check_against_reference("triton", s, t, y, temperature, alpha=alpha, beta=beta, reduction=reduction)


def test_triton_mixed_dtypes_and_wide_logits():
    s, _ = make_logits((3, 400), torch.bfloat16, std=30.0, device=DEVICE)
    _, t = make_logits((3, 400), torch.float32, std=30.0, device=DEVICE)
    check_against_reference("triton", s, t, make_labels((3,), 400, device=DEVICE), 1.0)


def test_triton_out_of_range_label_gives_nan_and_float64_is_refused():
    s, t = make_logits((3, 20), device=DEVICE)
    loss, grad = torch.ops.fastkd.dkd_forward_triton(s, t, torch.tensor([1, 20, -100], device=DEVICE), 1.0, 1.0, 8.0, -100, "none", True)
    assert torch.isnan(loss[1]) and torch.isnan(grad[1]).all()
    assert torch.isfinite(loss[0]) and loss[2] == 0 and torch.equal(grad[2], torch.zeros_like(grad[2]))
    with pytest.raises(RuntimeError, match="float64 input runs on the cuda, cpu or reference backend"):
        fastkd.dkd_loss(s.double(), t.double(), torch.tensor([1, 2, 3], device=DEVICE), backend="triton")


def test_launch_configuration_is_named_in_one_place():
    from fastkd.kernels import _softmax, dkd as kernel

    assert kernel.launch_config(32000, True) in kernel.LAUNCH_CONFIGS
    assert kernel.launch_config(5, True) == (8, 1)
    assert kernel.launch_config(32000, False)[0] == _softmax.BLOCK_V_MAX_INTERPRETER
    assert max(b for b, _ in kernel.LAUNCH_CONFIGS) == kernel.BLOCK_V_MAX_GPU
