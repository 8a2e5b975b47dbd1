"""The relational losses' GPU backends (CUDA C++ and Triton, compiled) against the references, on a
CUDA device. Skipped where none exists: these run, and must pass, wherever one does."""

import pytest
import torch

import fastkd
from fastkd import _ext
from backend_helpers import backend_params
from kd_helpers import check_float64_matches_reference
from relational_helpers import (
    OPS,
    THIN,
    THIN_IDS,
    check_against_reference,
    check_degenerate_batch,
    check_no_worse_than_composite,
    make_embeddings,
    public,
    reference,
    rkd_distance_from_differences,
)


SCHEMA = {"rkd_distance": "rkd_distance_forward", "rkd_angle": "rkd_angle_forward", "sp": "sp_forward", "pkt": "pkt_forward"}


BACKENDS = backend_params("rkd_angle_forward", None, names=("cuda", "triton"))
SHAPES = [(2, 1, 3), (37, 513, 200), (300, 70, 129), (8, (4, 3, 3), 5)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_gpu_matches_reference(backend, op, shape, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels compute in float32 and refuse float64")
    b, ds, dt = shape
    s, t = make_embeddings(b, ds, dt, dtype, seed=b, device="cuda")
    check_against_reference(op, backend, s, t)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kind", ["duplicates", "student_duplicates", "all_equal", "zero_row"])
def test_gpu_degenerate_batches(backend, op, kind):
    s, t = make_embeddings(70, 33, 20, kind=kind, seed=5, device="cuda")
    check_degenerate_batch(op, backend, s, t, kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["rkd_angle", "rkd_distance"])
@pytest.mark.parametrize("kind,b,d", THIN, ids=THIN_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gpu_thin_batches_no_worse_than_the_float32_composite(backend, op, kind, b, d, dtype):
    """As the cpu test (test_relational.py): thin triangles and close pairs no worse than PyTorch's
    float32 composite; RKD distance also no worse than the float32 composite that forms every
    distance from its row difference (the Gram-based one is far off on near duplicates)."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels compute in float32 and refuse float64")
    for seed in range(3):
        s, t = make_embeddings(b, d, 9, dtype, kind=kind, seed=seed, device="cuda")
        check_no_worse_than_composite(op, backend, s, t)
        if op == "rkd_distance":
            check_no_worse_than_composite(op, backend, s, t, composite_fn=rkd_distance_from_differences)


@pytest.mark.parametrize("op", OPS)
def test_gpu_cuda_float64_and_gradcheck(op):
    if not (_ext.LOAD_ERROR is None and _ext.has_kernel(SCHEMA[op], "CUDA")):
        pytest.skip("built without CUDA")
    s, t = make_embeddings(13, 33, 21, torch.float64, kind="duplicates", seed=11, device="cuda")
    check_float64_matches_reference(lambda x: public(op)(x, t, backend="cuda"), lambda x: reference(op)(x.cpu(), t.cpu()), s,
                                    loss_tol=(1e-12, 1e-15), grad_tol=(1e-9, 1e-15))
    x, tt = make_embeddings(4, 3, 5, torch.float64, seed=8, device="cuda")
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y: public(op)(y, tt, backend="cuda"), (x,))
    assert torch.autograd.gradgradcheck(lambda y: public(op)(y, tt, backend="cuda"), (x,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_angle_large_batch_agrees_with_cpu(backend):
    """A batch spanning many tiles and row blocks of every kernel, against the cpu backend."""
    s, t = make_embeddings(700, 64, 48, seed=21)
    a, b = s.clone().cuda().requires_grad_(True), s.clone().requires_grad_(True)
    got, expected = fastkd.rkd_angle_loss(a, t.cuda(), backend=backend), fastkd.rkd_angle_loss(b, t, backend="cpu")
    torch.testing.assert_close(got.cpu(), expected, rtol=2e-5, atol=0)
    got.backward()
    expected.backward()
    torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-3, atol=1e-4 * float(b.grad.abs().max()))
