"""A non-default ``ignore_index`` on every backend of every op that takes one.

The value is a valid class (7), so a kernel or launcher that compared labels with -100 instead
would count the rows labelled 7 as ordinary rows of class 7. The oracle does not rely on
``ignore_index`` at all: it is the float64 reference on the *other* rows only (and their labels,
none of which is -100), so the ignored rows must get loss 0 and gradient exactly 0, and the rest
must match it entry by entry (kd_helpers' tolerance rule). ``batchmean`` divides by the rows
kept, so the launchers' count of valid rows is checked too.
"""

import numpy as np
import pytest
import torch

import fastkd
from fastkd.ops import kd as kd_ops
from backend_helpers import backend_params, device_of
from kd_helpers import assert_within_tolerance, make_logits
from sparse_kd_helpers import top_k

BACKENDS = backend_params("kd_forward", kd_ops.TRITON_ERROR)

N, V, H, HT = 6, 300, 16, 12  # V > 256: the Triton interpreter's blocked path
IGNORE = 7
T = 2.5
IGNORED = [1, 4]
KEPT = [i for i in range(N) if i not in IGNORED]


def _labels():
    y = torch.randint(0, V - 1, (N,), generator=torch.Generator().manual_seed(1))
    y = torch.where(y >= IGNORE, y + 1, y)  # every class but 7 ...
    y[IGNORED] = IGNORE  # ... which marks the ignored rows
    return y


LABELS = _labels()
assert set(LABELS[KEPT].tolist()).isdisjoint({IGNORE, -100}) and int(LABELS[0]) != IGNORE


def _grad_output(reduction, rows):
    if reduction == "none":
        return torch.linspace(0.5, 1.5, N, dtype=torch.float64)[rows]
    return torch.tensor(0.7, dtype=torch.float64)


def _kd(divergence="kl", beta=None, teachers=0):
    def call(backend, x, rows, y, temperature=T, **kw):
        _, t = make_logits((N, V), seed=0)
        if teachers:
            t = torch.stack([t] + [make_logits((N, V), seed=10 + m)[1] for m in range(teachers - 1)])[:, rows]
        else:
            t = t[rows]
        return fastkd.kd_loss(x, t.to(x.device), temperature, labels=y, hard_weight=0.3, divergence=divergence, beta=beta, backend=backend, **kw)

    return call


def _sparse(values, tail):
    def call(backend, x, rows, y, temperature=T, **kw):
        _, t = make_logits((N, V), seed=0)
        vals, idx = top_k(t, 16, values, torch.float32)
        return fastkd.sparse_kd_loss(x, vals[rows].to(x.device), idx[rows].to(x.device), temperature, values=values, tail=tail, labels=y, hard_weight=0.3, backend=backend, **kw)

    return call


def _dkd(backend, x, rows, y, temperature=T, **kw):
    _, t = make_logits((N, V), seed=0)
    return fastkd.dkd_loss(x, t[rows].to(x.device), y, temperature, alpha=1.0, beta=4.0, backend=backend, **kw)


# op -> call(backend, student, rows, labels, ignore_index=..., reduction=...): the loss on ``rows``
OPS = {
    "kd": _kd(),
    "kd-reverse_kl": _kd("reverse_kl"),
    "kd-jsd-ensemble": _kd("jsd", 0.3, teachers=2),
    "sparse_kd": _sparse("logits", "renormalize"),
    "sparse_kd-uniform": _sparse("logprobs", "uniform"),
    "dkd": _dkd,
}


def _logits_case(op, backend, rows, labels, dtype, device, **kw):
    """(loss, [d student]) of (loss * grad_output).sum() on ``rows`` of the student logits."""
    x = make_logits((N, V), seed=0)[0][rows].to(dtype).to(device).requires_grad_(True)
    loss = OPS[op](backend, x, rows, labels[rows].to(device), **kw)
    (loss * _grad_output(kw["reduction"], rows).to(loss)).sum().backward()
    return loss.detach().cpu(), [x.grad.cpu()]


def _fused_linear_case(op, backend, rows, labels, dtype, device, temperature=T, **kw):
    """(loss, [d hidden]) of fused_linear_kd_loss on ``rows`` of the hidden states (the weight and
    bias gradients are sums of the same rows' logit gradients, test_fused_linear.py's business)."""
    g = torch.Generator().manual_seed(5)
    h, w, b = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * H**-0.5, torch.randn(V, generator=g) * 0.1
    ht, wt = torch.randn(N, HT, generator=g), torch.randn(V, HT, generator=g) * HT**-0.5 * 2
    leaves = [p.to(dtype).to(device).requires_grad_(True) for p in (h[rows], w, b)]
    loss = fastkd.fused_linear_kd_loss(leaves[0], leaves[1], ht[rows].to(dtype).to(device), wt.to(dtype).to(device), temperature,
                                       student_bias=leaves[2], labels=labels[rows].to(device), hard_weight=0.3, chunk_size=4,
                                       backend=backend, **kw)
    (loss * _grad_output(kw["reduction"], rows).to(loss)).sum().backward()
    return loss.detach().cpu(), [leaves[0].grad.cpu()]


CASES = {op: _logits_case for op in OPS} | {"fused_linear": _fused_linear_case}


def _on_all_rows(value, row_indexed):
    """A kept-rows-only result placed in the rows it belongs to (zeros in the ignored ones);
    a scalar loss as it is."""
    if not row_indexed:
        return value
    full = torch.zeros((N,) + value.shape[1:], dtype=value.dtype)
    full[KEPT] = value
    return full


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(CASES))
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_a_non_default_ignore_index_reaches_every_backend(op, backend, reduction):
    device = device_of(backend)
    case = CASES[op]
    loss, grads = case(op, backend, list(range(N)), LABELS, torch.float32, device, ignore_index=IGNORE, reduction=reduction)
    exact = case(op, "reference", KEPT, LABELS, torch.float64, "cpu", reduction=reduction)
    lowp = case(op, "reference", KEPT, LABELS, torch.float32, "cpu", reduction=reduction)
    per_row = reduction == "none"
    assert_within_tolerance("loss", loss, _on_all_rows(exact[0], per_row), _on_all_rows(lowp[0], per_row), torch.float32)
    assert torch.equal(grads[0][IGNORED], torch.zeros_like(grads[0][IGNORED])), "an ignored row has a gradient"
    assert_within_tolerance("grad", grads[0], _on_all_rows(exact[1][0], True), _on_all_rows(lowp[1][0], True), torch.float32)


@pytest.mark.parametrize("op", list(CASES))
def test_numpy_and_tensor_numbers_are_the_python_numbers_they_hold(op):
    """An ignore_index given as a numpy or 0-d tensor integer, and a numpy temperature, act as
    the Python numbers they hold (on the automatic backend)."""
    rows = list(range(N))
    expected = CASES[op](op, None, rows, LABELS, torch.float32, "cpu", ignore_index=IGNORE, reduction="none")
    for ignore_index in (np.int64(IGNORE), np.int32(IGNORE), torch.tensor(IGNORE)):
        got = CASES[op](op, None, rows, LABELS, torch.float32, "cpu", temperature=np.float32(T), ignore_index=ignore_index, reduction="none")
        torch.testing.assert_close(got, expected, msg=lambda m: f"ignore_index={ignore_index!r}: {m}")  # noqa: B023 (called at once)
