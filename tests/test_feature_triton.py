"""hint_loss and attention_transfer_loss on their Triton kernels, against the references. Without
a GPU it runs in Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1),
which is slow: shapes stay small, but larger than the interpreter's blocks (64 entries per hint
chunk, 4 x 16 attention tiles) so that several chunks per row and partial tiles run."""

import math

import pytest
import torch

import fastkd
from fastkd.ops import feature as feature_ops
from backend_helpers import triton_module_device
from feature_helpers import check_at, check_hint, make_features, make_maps

DEVICE = triton_module_device(feature_ops.HINT_TRITON_ERROR)
KINDS = list(feature_ops.HINT_KINDS)


@pytest.mark.parametrize(
    "shape,dtype",
    [((3, 2, 50), torch.float32), ((2, 201), torch.bfloat16), ((1, 1), torch.float32), ((4, 7, 3, 3), torch.float16)],
)
def test_triton_hint_matches_reference(shape, dtype):
    s, t = make_features(shape, dtype, seed=shape[-1], device=DEVICE)
    for kind in KINDS:
        for reduction in ("mean", "sum", "none"):
            check_hint("triton", s, t, kind, reduction)


@pytest.mark.parametrize(
    "shape,teacher_channels,dtype,p",
    [
        ((2, 5, 6, 7), 9, torch.float32, 2.0),  # HW = 42: three 16-wide tiles, the last partial
        ((3, 3, 4, 4), 2, torch.bfloat16, 1.0),
        ((2, 6, 5), 3, torch.float16, 3.0),
        ((2, 4, 3, 3), 4, torch.float32, 4.0),
        ((2, 5, 4, 5), 6, torch.float32, 2.5),
        ((1, 1, 1, 1), 1, torch.float32, 2.0),
    ],
)
def test_triton_attention_matches_reference(shape, teacher_channels, dtype, p):
    s, t = make_maps(shape, teacher_channels, dtype, seed=shape[1], relu=p == 1.0, device=DEVICE)
    for reduction in ("mean", "sum", "none"):
        check_at("triton", s, t, p, reduction)


def test_triton_attention_list_zero_maps_and_nan():
    a, b = make_maps((2, 3, 4, 4), 5, device=DEVICE)
    c, d = make_maps((2, 4, 2, 3), 2, seed=1, device=DEVICE)
    a[0] = 0
    d[1] = 0
    check_at("triton", [a, c], [b, d])
    x = a.clone().requires_grad_(True)
    loss = fastkd.attention_transfer_loss(x, b, backend="triton")
    loss.backward()
    assert torch.isfinite(loss) and torch.equal(x.grad[0], torch.zeros_like(x.grad[0]))
    b2 = b.clone()
    b2[1, 0, 1, 1] = math.nan
    rows = fastkd.attention_transfer_loss(a, b2, reduction="none", backend="triton")
    assert torch.isnan(rows[1]) and torch.isfinite(rows[0])


def test_triton_hint_zero_rows_and_nan():
    s, t = make_features((4, 70), device=DEVICE)
    s[1] = 0
    t[2] = 0
    s[3] = 1e-10
    for kind in KINDS:
        check_hint("triton", s, t, kind, "none")
    s[0, 5] = math.nan
    for kind in KINDS:
        rows = fastkd.hint_loss(s, t, kind=kind, reduction="none", backend="triton")
        assert torch.isnan(rows[0]) and torch.isfinite(rows[1:]).all(), kind


def test_triton_refuses_float64():
    s, t = make_features((2, 5), torch.float64, device=DEVICE)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run this call: its kernel computes in float32"):
        fastkd.hint_loss(s, t, backend="triton")


def test_static_launches_cover_the_launchers_choices():
    """Every fp32 configuration a GPU launch can choose is among the statically listed ones (the
    exact-power P_MODEs 1, 3, 4 at the largest attention block, as static_launches() says)."""
    from fastkd.kernels import feature as kf

    launches = kf.static_launches()
    hint = {(l.args["BLOCK"], l.num_warps, l.args.get("KIND")) for l in launches if l.kernel is kf._hint_kernel}
    for dim in (1, 2, 100, 300, 1000, 2048, 4097, 10**6):
        block, warps = kf.hint_launch_shape(dim)
        for code in kf.HINT_KIND_CODES.values():
            assert (block, warps, code) in hint, (dim, block, warps, code)
    at = {(l.args["BLOCK_C"], l.args["BLOCK_J"], l.num_warps, l.args["P_MODE"]) for l in launches if l.kernel is kf._at_grad_kernel}
    for spatial in (1, 3, 49, 196, 1024, 4096):
        block_c, block_j, warps = kf.at_launch_shape(spatial)
        ps = (1.0, 2.0, 3.0, 4.0, 2.5, 1.5) if block_j == kf.AT_BLOCK_J_MAX_GPU else (2.0, 2.5, 1.5)
        for p in ps:
            assert (block_c, block_j, warps, kf.at_p_mode(p)) in at, (spatial, p)
