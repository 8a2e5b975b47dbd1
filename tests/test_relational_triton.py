"""The relational losses' Triton kernels against the references. Without a GPU they run in
Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1), which is slow:
batches stay small, but larger than the interpreter's blocks (row chunks of 8, angle tiles of 8×8)
so that every chunked path and tile edge runs."""

import math

import pytest
import torch

import fastkd
from fastkd.ops import table
from backend_helpers import triton_module_device
from relational_helpers import (
    OPS,
    THIN,
    THIN_IDS,
    check_against_reference,
    check_degenerate_batch,
    check_no_worse_than_composite,
    loss_and_grad,
    make_embeddings,
    public,
    reference,
    rkd_distance_from_differences,
)

DEVICE = triton_module_device(next((op.kernel.triton_error for op in table.all_ops("relational") if op.kernel.triton_error), None))
SCHEMA = {"rkd_distance": "rkd_distance_forward_triton", "rkd_angle": "rkd_angle_forward_triton", "sp": "sp_forward_triton", "pkt": "pkt_forward_triton"}

CASES = [
    # b, ds, dt, dtype, kind
    (2, 1, 3, torch.float32, "random"),
    (11, 6, 5, torch.float32, "random"),
    (9, (2, 3), 4, torch.bfloat16, "random"),
    (10, 7, 9, torch.float16, "random"),
    (10, 6, 4, torch.float32, "duplicates"),
    (10, 6, 4, torch.float32, "student_duplicates"),
    (9, 5, 4, torch.float32, "all_equal"),
    (9, 5, 4, torch.float32, "zero_row"),
]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("b,ds,dt,dtype,kind", CASES, ids=[f"{c[0]}-{c[3]}-{c[4]}".replace("torch.", "") for c in CASES])
def test_triton_matches_reference(op, b, ds, dt, dtype, kind):
    s, t = make_embeddings(b, ds, dt, dtype, kind=kind, seed=b, device=DEVICE)
    if kind == "all_equal" and op == "pkt":
        # Equal student rows: PKT's exact gradient is 0 up to float64 noise (7e-14); the float32
        # cosines of equal rows leave 1e-11 of noise in the kernel (6e-13 in PyTorch's float32
        # composite), which no bound relative to a gradient of 0 can scale. It must be that small.
        loss, grad = loss_and_grad(lambda *a: public(op)(*a, backend="triton"), s, t)
        exact_loss, _ = loss_and_grad(reference(op), s.cpu().double(), t.cpu().double())
        torch.testing.assert_close(loss.double().cpu(), exact_loss, rtol=1e-5, atol=1e-7)
        assert grad.abs().max().item() < 1e-9
        return
    check_degenerate_batch(op, "triton", s, t, kind)


@pytest.mark.parametrize("op", ["rkd_angle", "rkd_distance"])
@pytest.mark.parametrize("kind,b,d", THIN, ids=THIN_IDS)
def test_triton_thin_batches_no_worse_than_the_float32_composite(op, kind, b, d):
    """Thin triangles and close pairs (collinear rows, 1-D embeddings, duplicated and nearly
    duplicated rows): RKD angle runs thin vertices in float64 and RKD distance takes close pairs
    from the rows (kernels/relational.py); both must be no worse than PyTorch's float32 composite.
    One seed in float32 and bf16 here (the interpreter is slow); tests/test_relational_gpu.py runs
    three in every dtype."""
    for dtype in (torch.float32, torch.bfloat16):
        s, t = make_embeddings(b, d, 9, dtype, kind=kind, seed=0, device=DEVICE)
        check_no_worse_than_composite(op, "triton", s, t)


def test_triton_distance_close_pairs_no_worse_than_differences():
    """Near-duplicate rows (pairs at 1e-3 and 1e-4 of the spread): the Gram-based composite is off
    by ~30 % there, so the bar is the float32 composite that forms every distance from its row
    difference; M·E alone would lose ~spread / distance of the close pairs' gradient digits, and
    _rkd_distance_close_kernel adds them from the rows instead."""
    s, t = make_embeddings(16, 32, 9, kind="near_duplicates", seed=0, device=DEVICE)
    check_no_worse_than_composite("rkd_distance", "triton", s, t, composite_fn=rkd_distance_from_differences)


@pytest.mark.parametrize("op", ["sp", "pkt"])
def test_triton_batch_of_one(op):
    s, t = make_embeddings(1, 6, 4, device=DEVICE)
    loss, grad = check_against_reference(op, "triton", s, t)
    assert loss == 0 and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("op", OPS)
def test_triton_nan_and_no_grad(op):
    s, t = make_embeddings(6, 5, 4, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(public(op)(s, t, backend="triton"), reference(op)(s, t))
    out = getattr(torch.ops.fastkd, SCHEMA[op])(*((s, t, 1e-7, False) if op == "pkt" else (s, t, False)))
    assert out[1].numel() == 0
    t = t.clone()
    t[3, 2] = math.nan
    assert torch.isnan(public(op)(s, t, backend="triton"))


def test_triton_refuses_float64():
    s, t = make_embeddings(4, 3, 3, torch.float64, device=DEVICE)
    with pytest.raises(RuntimeError, match="computes in float32; float64 input runs on"):
        fastkd.rkd_angle_loss(s, t, backend="triton")


def test_static_launches_cover_the_launchers_choices():
    """Every (ROW_BLOCK, warps) and angle tile a GPU batch can choose is among the statically
    compiled launches of every row kernel (tests/test_gpu_static.py compiles them)."""
    from fastkd.kernels import relational as kr

    launches = kr.static_launches()
    compiled = {(l.kernel, l.args.get("BLOCK"), l.num_warps) for l in launches}
    largest = {w: b for b, w in kr._row_shapes()}
    for n in (2, 3, 37, 100, 513, 1024, 5000):
        cfg = kr.launch_config(n, torch.device("cuda"))
        for kernel in (kr._rkd_distance_sums_kernel, kr._sp_rows_kernel, kr._pkt_grad_kernel):
            # the largest block of the launch's warp count stands for the smaller ones
            assert (kernel, largest[cfg["row_warps"]], cfg["row_warps"]) in compiled, (n, kernel)
        assert (cfg["BLOCK_J"], cfg["BLOCK_K"], cfg["angle_warps"]) == (
            *kr.ANGLE_TILE_GPU, kr.ANGLE_WARPS), "the angle tile is fixed on a GPU"
