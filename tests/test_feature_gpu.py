"""hint_loss and attention_transfer_loss on the GPU backends (CUDA C++ and Triton, compiled)
against the references, on a CUDA device. Skipped where none exists: these run, and must pass,
wherever one does."""

import math

import pytest
import torch

import fastkd
from fastkd.ops import feature as feature_ops
from backend_helpers import backend_params
from feature_helpers import check_at, check_hint, make_features, make_maps


BACKENDS = backend_params("hint_forward", None, names=("cuda", "triton"))
KINDS = list(feature_ops.HINT_KINDS)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def skip_float64_on_triton(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels compute in float32 and refuse float64")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(41, 1271), (3, 131073), (2, 3, 257), (1, 1), (64, 512, 4, 4)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_hint_matches_reference(backend, shape, dtype, kind):
    skip_float64_on_triton(backend, dtype)
    s, t = make_features(shape, dtype, seed=shape[-1], device="cuda")
    for reduction in ("mean", "sum", "none"):
        check_hint(backend, s, t, kind, reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,teacher_channels", [((2, 3, 5, 7), 6), ((4, 16, 9, 9), 8), ((3, 5, 33), 2), ((1, 1, 1, 1), 1), ((8, 64, 32, 32), 128)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, 4.0, 2.5])
def test_gpu_attention_matches_reference(backend, shape, teacher_channels, dtype, p):
    skip_float64_on_triton(backend, dtype)
    s, t = make_maps(shape, teacher_channels, dtype, seed=shape[1], relu=p == 1.0, device="cuda")
    for reduction in ("mean", "sum", "none"):
        check_at(backend, s, t, p, reduction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_awkward_inputs(backend):
    s, t = make_features((5, 640), device="cuda")
    s[1] = 0
    t[2] = 0
    s[3] = 1e-10
    for kind in KINDS:
        check_hint(backend, s, t, kind, "none")
        check_hint(backend, s.t()[::2].t(), t.t()[1::2].t(), kind)  # non-contiguous
    mixed_s, _ = make_features((4, 300), torch.bfloat16, device="cuda")
    _, mixed_t = make_features((4, 300), torch.float32, device="cuda")
    for kind in KINDS:
        check_hint(backend, mixed_s, mixed_t, kind)
    ms, mt = make_maps((4, 8, 6, 6), 4, relu=True, device="cuda")
    ms[0] = 0
    mt[1] = 0
    check_at(backend, ms.to(memory_format=torch.channels_last), mt, 2.0, "none")
    check_at(backend, [ms, ms[:, :3]], [mt, mt[:, :5]])
    x = ms.clone().requires_grad_(True)
    fastkd.attention_transfer_loss(x, mt, backend=backend).backward()
    assert torch.equal(x.grad[0], torch.zeros_like(x.grad[0]))
    s[2, 7] = math.nan
    for kind in KINDS:
        rows = fastkd.hint_loss(s, t, kind=kind, reduction="none", backend=backend)
        assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3, 4]]).all(), kind


