"""Shared by the relational-loss tests of every backend: inputs, the float64 oracle, and the
FlashAttention-style tolerance rule of kd_helpers (a backend's error against the float64 reference
at most 4x PyTorch's own error at the input precision, plus a floor)."""

from __future__ import annotations

import torch

import fastkd
from fastkd.ops import relational as rel
from kd_helpers import assert_within_tolerance

OPS = ("rkd_distance", "rkd_angle", "sp", "pkt")
# The smallest batch each op accepts.
MIN_BATCH = {"rkd_distance": 2, "rkd_angle": 2, "sp": 1, "pkt": 1}
GRAD_OUTPUT = 0.7
# Thin and near-coincident batches: (kind, B, D). Collinear rows (every triangle degenerate), exactly
# 1-D embeddings, rows repeated, rows moved by 1e-3 and 1e-4 of the batch's spread.
THIN = [("collinear", 8, 513), ("random", 37, 1), ("collinear_duplicates", 12, 24), ("near_duplicates", 16, 32)]
THIN_IDS = ["collinear", "1-D", "collinear+duplicate", "near-duplicates"]


def public(op):
    return getattr(fastkd, f"{op}_loss")


def reference(op):
    return getattr(rel, f"{op}_loss_reference")


def make_embeddings(b, ds, dt, dtype=torch.float32, *, kind="random", std=1.0, offset=0.0, seed=0, device="cpu"):
    """Student ``[b, *ds]`` and teacher ``[b, *dt]`` (``ds``, ``dt``: an int or a shape).

    ``kind``: ``random``; ``duplicates`` (rows 1 and b-1 repeat row 0 in student and teacher: the
    same sample twice); ``student_duplicates`` (only the student's rows repeat: zero difference
    vectors the teacher does not have); ``all_equal`` (every student row the same); ``zero_row``
    (row 1 of the student and row 0 of the teacher are zero); ``collinear`` (student rows on one
    line, a + t_i v); ``collinear_duplicates`` (the same, with row 1 repeating row 0 in student and
    teacher); ``near_duplicates`` (row 1 is row 0 moved by ~1e-3, row b-1 is row 2 moved by ~1e-4,
    relative to the batch's spread of ~1)."""
    ds = (ds,) if isinstance(ds, int) else tuple(ds)
    dt = (dt,) if isinstance(dt, int) else tuple(dt)
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn((b,) + ds, generator=gen, dtype=torch.float64) * std + offset
    t = torch.randn((b,) + dt, generator=gen, dtype=torch.float64) * std + offset
    if kind in ("duplicates", "student_duplicates") and b >= 2:
        s[1] = s[0]
        s[-1] = s[0]
        if kind == "duplicates":
            t[1] = t[0]
            t[-1] = t[0]
    elif kind == "all_equal":
        s[:] = s[0]
    elif kind == "zero_row":
        s[min(1, b - 1)] = 0
        t[0] = 0
    elif kind in ("collinear", "collinear_duplicates"):
        a, v = torch.randn((2,) + ds, generator=gen, dtype=torch.float64)
        s = a * std + offset + torch.randn((b,) + (1,) * len(ds), generator=gen, dtype=torch.float64) * v * std
        if kind == "collinear_duplicates" and b >= 2:
            s[1] = s[0]
            t[1] = t[0]
    elif kind == "near_duplicates" and b >= 3:
        s[1] = s[0] + 1e-3 * std * torch.randn(ds, generator=gen, dtype=torch.float64) / max(s[0].numel(), 1) ** 0.5
        s[-1] = s[2] + 1e-4 * std * torch.randn(ds, generator=gen, dtype=torch.float64) / max(s[0].numel(), 1) ** 0.5
    elif kind != "random":
        raise ValueError(kind)
    return s.to(dtype).to(device), t.to(dtype).to(device)


def loss_and_grad(fn, student, teacher, grad_output=GRAD_OUTPUT, **kwargs):
    x = student.detach().clone().requires_grad_(True)
    loss = fn(x, teacher, **kwargs)
    (loss * grad_output).backward()
    return loss.detach(), x.grad


def check_against_reference(op, backend, student, teacher, **kwargs):
    """The backend's loss and gradient against the float64 reference, within the bound."""
    loss, grad = loss_and_grad(lambda *a, **k: public(op)(*a, backend=backend, **k), student, teacher, **kwargs)
    s, t = student.cpu(), teacher.cpu()
    exact = loss_and_grad(reference(op), s.double(), t.double(), **kwargs)
    lowp = loss_and_grad(reference(op), s, t, **kwargs)
    want = torch.float64 if student.dtype == torch.float64 else torch.float32
    assert loss.dtype == want, f"loss dtype {loss.dtype}, expected {want}"
    assert loss.shape == (), f"loss shape {tuple(loss.shape)}"
    assert grad.dtype == student.dtype and grad.shape == student.shape, f"grad {grad.dtype} {tuple(grad.shape)}"
    assert_within_tolerance(f"{op} loss", loss, exact[0], lowp[0], want)
    assert_within_tolerance(f"{op} grad", grad, exact[1], lowp[1], student.dtype, scale=terms_scale(exact[1], s))
    return loss, grad


def terms_scale(grad: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """The size of the terms each gradient entry sums: a relational gradient is a combination of
    the batch's rows, G = M X (M = G X⁺ recovers a B×B M that gives it), whose entries
    sum terms up to |M| |X| before they cancel; a kernel computing it in another order (from
    the Gram matrix, say) errs relative to that, not to the result; and its pairwise quantities
    are dot products over the D features of a row, whose rounding grows as √D (the random-walk
    model of summation error). At least the row's largest entry."""
    g = grad.double().cpu().reshape(grad.shape[0], -1)
    x = student.double().cpu().reshape(student.shape[0], -1)
    m = g @ torch.linalg.pinv(x)
    terms = (m.abs() @ x.abs()) * x.shape[1] ** 0.5
    return torch.maximum(terms, g.abs().amax(dim=1, keepdim=True)).reshape(grad.shape)


def rkd_distance_from_differences(student, teacher):
    """``rkd_distance_loss`` with every distance formed from its row difference (the [B, B, D]
    formulation, in the input's dtype): no Gram identity, so it is accurate on close pairs, where
    the composite (and the Gram-based reference) cancels. A stricter bar than the composite there."""

    def normalised(e):
        b = e.shape[0]
        d = (e.unsqueeze(0) - e.unsqueeze(1)).pow(2).sum(-1).clamp(min=rel.PDIST_EPS).sqrt()
        d = torch.where(~torch.eye(b, dtype=torch.bool), d, torch.zeros_like(d))
        return d / (d.sum() / (b * (b - 1)))

    s, t = student.reshape(student.shape[0], -1), teacher.detach().reshape(teacher.shape[0], -1)
    return torch.nn.functional.smooth_l1_loss(normalised(s), normalised(t))


def check_no_worse_than_composite(op, backend, student, teacher, factor=2.0, composite_fn=None):
    """On thin or near-coincident batches (collinear rows, 1-D embeddings, near duplicates) the
    backend's gradient against the float64 reference: at most ``factor`` times the error of the
    float32 composite (the reference computed in float32, as a user of plain PyTorch would) on the
    same inputs (for float64 input too: the issue's bar), plus 1e-6 of the largest float64 gradient entry (a collinear batch's exact
    gradient is ~0, and both errors are rounding noise there). ``composite_fn``: another float32
    composite to compare with (default: the reference). Returns (backend error, composite error)."""
    _, grad = loss_and_grad(lambda *a, **k: public(op)(*a, backend=backend, **k), student, teacher)
    s, t = student.cpu(), teacher.cpu()
    _, exact = loss_and_grad(reference(op), s.double(), t.double())
    # float32 and float64 input: the composite in float32; 16-bit input: on the same input (it
    # computes in float32 and rounds its gradient to the input's dtype, as the backends do).
    lowp = s if s.dtype in (torch.bfloat16, torch.float16) else s.float()
    _, composite = loss_and_grad(composite_fn or reference(op), lowp, t.float())
    err = float((grad.cpu().double() - exact).abs().max())
    err_composite = float((composite.double() - exact).abs().max())
    # Floor: 1e-6 of the largest entry, or one rounding of it for a 16-bit gradient (two single
    # roundings of nearby values to bf16 may differ by a unit in the last place).
    floor = max(1e-6, torch.finfo(student.dtype).eps if student.dtype in (torch.bfloat16, torch.float16) else 0.0)
    bound = factor * err_composite + floor * float(exact.abs().max())
    assert torch.isfinite(grad).all()
    assert err <= bound, f"{op} ({backend}) gradient error {err:.3g} > {factor} x the float32 composite's {err_composite:.3g} (+ floor)"
    return err, err_composite


def check_degenerate_batch(op, backend, student, teacher, kind):
    """A batch of ``make_embeddings``' degenerate ``kind`` (zero difference vectors, zero rows):
    the reference's loss and gradient (F.normalize and clamp kinks included), never NaN."""
    loss, grad = check_against_reference(op, backend, student, teacher)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    s, t = student.cpu(), teacher.cpu()
    if kind == "student_duplicates":
        # The duplicated rows' gradient explodes (the reference's: x / 1e-12 for a zero
        # difference); the other rows' (rows 1 and b-1 repeat row 0) must stay as accurate as on
        # a clean batch.
        rows = list(range(2, s.shape[0] - 1))
        _, exact = loss_and_grad(reference(op), s.double(), t.double())
        _, lowp = loss_and_grad(reference(op), s, t)
        assert_within_tolerance(f"{op} grad of rows without a duplicate", grad[rows].cpu(), exact[rows], lowp[rows], s.dtype)
    if kind == "all_equal" and op in ("rkd_distance", "rkd_angle"):
        # Every student distance is the clamped 1e-6 (distance) or every difference is zero
        # (angle): the reference's gradient is exactly 0, and so is ours.
        assert torch.equal(grad, torch.zeros_like(grad))
