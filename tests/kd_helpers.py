"""Shared by the kd_loss tests of every backend: inputs, the float64 oracle, and the tolerance rule.

The tolerance rule (after FlashAttention's tests), entry by entry: a backend's error against the
float64 reference may be at most FACTOR times the error PyTorch's own composite makes *at that
entry* at the input's precision, plus what that comparison cannot see:

- one unit in the last place of the entry in its stored dtype: backend and PyTorch may round
  the same value to neighbouring representable numbers;
- FACTOR times PyTorch's largest error in the entry's *row* (the last dimension), measured in
  the precision the composite computes in (float32 for 16-bit input, before rounding to it):
  where terms cancel, float32 loses that much anywhere in the row, and the backend's and
  PyTorch's worst entries need not coincide;
- a tiny fraction of the entry's scale (the largest magnitude in its row unless the caller
  passes ``scale``, e.g. the sum of absolute terms of a matrix product), for rows where PyTorch
  happens to be exact.

Never a floor relative to the whole tensor's maximum: under it, every small entry, or every
low-magnitude row of ``reduction="none"``, could be wrong (even zero) and pass.
"""

from __future__ import annotations

import torch

import fastkd
from fastkd.functional import kd_loss_reference

FACTOR = 4.0
# One unit in the last place relative to the value, by the dtype the compared tensor is stored in.
ULP = {dtype: torch.finfo(dtype).eps for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16)}
# Relative to the entry's scale, for rows where PyTorch's own error is 0: a few units of the
# precision the kernels compute in (float64 for float64 input, float32 otherwise).
SCALE_FLOOR = {torch.float64: 1e-14, torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6}


def make_logits(shape, dtype=torch.float32, std=3.0, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(shape, generator=gen, dtype=torch.float64) * std).to(dtype)
    teacher = (torch.randn(shape, generator=gen, dtype=torch.float64) * std).to(dtype)
    return student.to(device), teacher.to(device)


def make_labels(rows_shape, vocab, ignored=(), seed=1, ignore_index=-100, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, rows_shape, generator=gen)
    flat = labels.view(-1)
    for i in ignored:
        flat[i] = ignore_index
    return labels.to(device)


def grad_output_for(loss_shape, seed=2):
    """A grad_output that is not 1: a scalar 0.7, or distinct per-row weights."""
    if len(loss_shape) == 0:
        return torch.tensor(0.7, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(loss_shape, generator=gen, dtype=torch.float64) + 0.5


def loss_and_grad(fn, student, *args, **kwargs):
    """The loss ``fn(student, *args[:-1], **kwargs)`` and the student's gradient of (loss times
    ``args[-1]``, the grad_output).sum()."""
    *args, grad_output = args
    s = student.detach().clone().requires_grad_(True)
    loss = fn(s, *args, **kwargs)
    (loss * grad_output.to(device=loss.device, dtype=loss.dtype)).sum().backward()
    return loss.detach(), s.grad


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the composites (and the kernels) compute in for input of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cpu(x):
    return x.cpu() if isinstance(x, torch.Tensor) else x


def _float64(x):
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def oracles(reference, student, *args, **kwargs):
    """``loss_and_grad`` of the reference three ways: in float64 (every floating input upcast),
    PyTorch's at the input precision, and PyTorch's gradient in its compute precision (before
    rounding to a 16-bit student dtype)."""
    *args, grad_output = args
    exact = loss_and_grad(reference, student.double(), *map(_float64, args), grad_output, **kwargs)
    lowp = loss_and_grad(reference, student, *args, grad_output, **kwargs)
    compute = loss_and_grad(reference, student.to(compute_dtype(student.dtype)), *args, grad_output, **kwargs)
    return exact, lowp, compute[1]


def references(student, teacher, temperature, grad_output, **kwargs):
    """``oracles`` of kd_loss."""
    return oracles(kd_loss_reference, student, teacher, temperature, grad_output, **kwargs)


def row_max(x: torch.Tensor) -> torch.Tensor:
    """The largest magnitude in each entry's row (the last dimension), broadcastable against
    ``x``; an entry of a 0-d or 1-d tensor (a loss, per-row losses) is its own row."""
    mag = x.abs()
    return mag if mag.dim() <= 1 else mag.amax(dim=-1, keepdim=True)


def gradient_scale(student_shape, grad_output, coefficient, labels=None, ignore_index=-100, reduction="batchmean"):
    """The scale of each row of a logits gradient: the factor its terms carry (``coefficient``,
    e.g. (1 - a) T + a for kd_loss: each term is a probability, or a difference of two, times
    it), with the reduction's 1 / valid rows and the row's grad_output. A row whose gradient
    cancels to ~0 (teacher and student alike) still has float32 errors of that size."""
    rows = student_shape[:-1]
    scale = torch.full(rows, float(coefficient), dtype=torch.float64)
    if reduction == "batchmean":
        valid = rows.numel() if labels is None else int((labels.cpu() != ignore_index).sum())
        scale = scale / max(valid, 1)
    scale = scale * grad_output.double().cpu().abs()
    return scale.unsqueeze(-1)


def kd_gradient_scale(student_shape, temperature, grad_output, hard_weight=0.0, t2_scale=True, **kwargs):
    """gradient_scale for kd_loss and sparse_kd_loss: (1 - a) (T or 1/T) + a."""
    soft = (1.0 - hard_weight) * (temperature if t2_scale else 1.0 / temperature)
    keep = {k: v for k, v in kwargs.items() if k in ("labels", "ignore_index", "reduction")}
    return gradient_scale(student_shape, grad_output, abs(soft) + hard_weight, **keep)


def tolerance(exact, lowp, dtype, scale=None, lowp_compute=None) -> torch.Tensor:
    """The bound of each entry (module docstring). ``lowp``: PyTorch's composite at the input's
    precision; ``lowp_compute``: the same before its result was rounded to a 16-bit dtype (the
    composite on the input upcast to float32); for a 16-bit ``dtype`` without it, the row term
    is left out (PyTorch's rounded row would hide small entries behind its largest one)."""
    exact, lowp = exact.double().cpu(), lowp.double().cpu()
    bound = FACTOR * (lowp - exact).abs() + ULP[dtype] * exact.abs().clamp_min(torch.finfo(dtype).tiny)
    if lowp_compute is not None:
        bound = bound + FACTOR * row_max(lowp_compute.double().cpu() - exact)
    elif dtype in (torch.float32, torch.float64):
        bound = bound + FACTOR * row_max(lowp - exact)
    scale = row_max(exact) if scale is None else scale.double().cpu().abs()
    return bound + SCALE_FLOOR[dtype] * scale


def assert_within_tolerance(name, got, exact, lowp, dtype, scale=None, lowp_compute=None):
    got, exact, lowp = got.double().cpu(), exact.double().cpu(), lowp.double().cpu()
    assert got.shape == exact.shape, f"{name}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    # A NaN reference would make every comparison below false, i.e. pass: refuse it.
    assert torch.isfinite(exact).all(), f"{name}: the float64 reference has non-finite values"
    err = (got - exact).abs()
    bound = tolerance(exact, lowp, dtype, scale, lowp_compute)
    over = err > bound
    if over.any():
        worst = int(torch.argmax(torch.where(over, err / bound, torch.zeros_like(err))))
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape)) if err.dim() else ()
        flat = lambda x: x.reshape(-1)[worst].item()  # noqa: E731
        raise AssertionError(
            f"{name}: {int(over.sum())} of {err.numel()} entries over the bound; worst at {where}: "
            f"got {flat(got):.6g}, exact {flat(exact):.6g}, error {flat(err):.3g} > bound {flat(bound):.3g} "
            f"(PyTorch's own error there {abs(flat(lowp) - flat(exact)):.3g})"
        )


def check_logits_loss(fn, reference, student, *args, grad_scale, **kwargs):
    """``fn(student, *args, **kwargs)`` (a backend's call of a logit loss) against ``reference``
    within the tolerance rule, with a grad_output that is not 1: the loss in the compute
    precision, the gradient in the student's dtype and shape. ``grad_scale(grad_output,
    **kwargs)``: each gradient row's scale (``gradient_scale``)."""
    loss_shape = () if kwargs.get("reduction", "batchmean") != "none" else student.shape[:-1]
    go = grad_output_for(loss_shape)
    loss, grad = loss_and_grad(fn, student, *args, go, **kwargs)
    cpu_kwargs = {k: _cpu(v) for k, v in kwargs.items()}
    exact, lowp, lowp_compute = oracles(reference, student.cpu(), *map(_cpu, args), go, **cpu_kwargs)
    want = compute_dtype(student.dtype)
    assert loss.dtype == want, f"loss dtype {loss.dtype}, expected {want}"
    assert grad.dtype == student.dtype, f"grad dtype {grad.dtype} != student dtype {student.dtype}"
    assert_within_tolerance("loss", loss, exact[0], lowp[0], want)
    scale = torch.maximum(row_max(exact[1]), grad_scale(go, **cpu_kwargs))
    assert_within_tolerance("grad", grad, exact[1], lowp[1], student.dtype, scale=scale, lowp_compute=lowp_compute)
    return loss, grad


def check_against_reference(backend, student, teacher, temperature, **kwargs):
    return check_logits_loss(lambda *a, **k: fastkd.kd_loss(*a, backend=backend, **k), kd_loss_reference, student, teacher, temperature,
                             grad_scale=lambda go, **kw: kd_gradient_scale(student.shape, temperature, go, **kw), **kwargs)


def check_float64_matches_reference(fn, reference, student, loss_tol=(1e-12, 1e-12), grad_tol=(1e-12, 1e-14)):
    """``fn(student)`` (a backend's call) against ``reference(student)`` on a float64 student:
    the loss is float64 and agrees to ``loss_tol`` (rtol, atol), the gradient of its sum to
    ``grad_tol``. 1e-12 is out of reach of any float32 step: a float32 coefficient alone is off by
    ~3e-8."""
    assert student.dtype == torch.float64
    a, b = student.detach().clone().requires_grad_(True), student.detach().clone().requires_grad_(True)
    got, expected = fn(a), reference(b)
    assert got.dtype == torch.float64, f"loss dtype {got.dtype}"
    torch.testing.assert_close(got.cpu(), expected.cpu(), rtol=loss_tol[0], atol=loss_tol[1])
    got.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(a.grad.cpu(), b.grad.cpu(), rtol=grad_tol[0], atol=grad_tol[1])


def check_poison_in_an_ignored_row_influences_nothing(call, student, poison, row=1):
    """``call(student)``, whose labels ignore ``row``, after ``poison()`` has written NaN (or a
    broken index) into that row's inputs in place: the loss and gradient are finite, the row's
    gradient is exactly 0, and the gradient is the one of the call before the poison."""
    clean = student.clone().requires_grad_(True)
    call(clean).backward()
    poison()
    x = student.clone().requires_grad_(True)
    loss = call(x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[row], torch.zeros_like(x.grad[row]))
    torch.testing.assert_close(x.grad, clean.grad)
