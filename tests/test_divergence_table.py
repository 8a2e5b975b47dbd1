"""fastkd/ops/divergences.py decides the divergence rules once; the backends must agree with it.

The public functions hand the kernels the pair ``divergences.resolve`` gives. The C++ op keeps a
parser of its own (for direct calls) and the Triton launcher its own checks, so each registered
op is called here with the pair as the user wrote it and must give, bit for bit, what the public
function gives: at every endpoint of every divergence that has one, and for every divergence.
"""

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd import _ext
from fastkd.ops import divergences
from fastkd.ops import kd as kd_ops
from backend_helpers import backend_params, device_of
from kd_helpers import make_logits

BACKENDS = backend_params("kd_forward", kd_ops.TRITON_ERROR, names=("cpu", "triton"))
# Every divergence at its default beta, and every divergence with a beta at each end of its range
# and inside it.
CASES = [(name, None) for name in divergences.DIVERGENCES] + [
    (name, beta)
    for name, d in divergences.DIVERGENCES.items() if d.beta is not None
    for beta in (0.0, 0.3) + ((1.0,) if d.beta[2] else ())
]
T = 1.7


def _inputs(backend):
    device = device_of(backend)
    s, t = make_logits((3, 40), torch.float32, device=device)
    return s, t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,beta", CASES, ids=[f"{n}-{b}" for n, b in CASES])
def test_op_given_the_raw_pair_agrees_with_the_table(backend, name, beta):
    s, t = _inputs(backend)
    x = s.clone().requires_grad_(True)
    public = fastkd.kd_loss(x, t, T, divergence=name, beta=beta, reduction="none", backend=backend)
    public.sum().backward()
    op = kd_ops.KD_FORWARD.op(backend)
    raw_beta = divergences.check(name, beta) or 0.0  # as the user's call would reach it, unresolved
    args = (s, t, None, None, name, raw_beta, T, 0.0, -100, "none", True, True)
    if backend == "triton" and divergences.resolve(name, raw_beta)[0] != name:
        # The Triton launcher decides nothing: it refuses an endpoint the op layer did not resolve.
        with pytest.raises(ValueError, match=r"beta=.* an endpoint is another divergence"):
            op(*args)
        return
    loss, grad = op(*args)
    assert torch.equal(loss, public.detach()), (name, beta)
    assert torch.equal(grad, x.grad), (name, beta)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_endpoints_are_the_divergences_they_equal(backend):
    """jsd at 0 is kl and at 1 reverse_kl, skew_kl at 0 is kl, skew_reverse_kl at 0 is
    reverse_kl: the same numbers, bit for bit, as the divergence itself."""
    expected = {("jsd", 0.0): "kl", ("jsd", 1.0): "reverse_kl", ("skew_kl", 0.0): "kl", ("skew_reverse_kl", 0.0): "reverse_kl"}
    table = {(name, b): to for name, d in divergences.DIVERGENCES.items() for b, to in d.endpoints.items()}
    assert table == expected
    s, t = _inputs(backend)
    for (name, beta), to in expected.items():
        got = fastkd.kd_loss(s, t, T, divergence=name, beta=beta, reduction="none", backend=backend)
        assert torch.equal(got, fastkd.kd_loss(s, t, T, divergence=to, reduction="none", backend=backend)), (name, beta)


@pytest.mark.skipif(_ext.LOAD_ERROR is not None, reason=str(_ext.LOAD_ERROR))
@pytest.mark.parametrize("name", [n for n, d in divergences.DIVERGENCES.items() if d.beta is not None])
def test_cpp_beta_range_is_the_table_range(name):
    s, t = make_logits((2, 9), torch.float32)
    for beta in (-1e-9, 0.0, 0.5, 1.0 - 1e-9, 1.0, 1.0 + 1e-9):
        try:
            divergences.check(name, beta)
            python_accepts = True
        except ValueError:
            python_accepts = False
        try:
            torch.ops.fastkd.kd_forward(s, t, None, None, name, beta, T, 0.0, -100, "sum", True, False)
            cpp_accepts = True
        except RuntimeError:
            cpp_accepts = False
        assert python_accepts == cpp_accepts, (name, beta, python_accepts)


def _x(name, beta, q, p, log_q, log_p):
    """x of the gradient k q (x - <q, x>) (docs/design.md#divergences)."""
    if name == "kl":
        return -p / q
    if name == "reverse_kl":
        return log_q - log_p
    if name == "tvd":
        return torch.sign(q - p)
    if name == "hellinger":
        return -(p / q).sqrt()
    if name == "skew_reverse_kl":
        m = (1 - beta) * p + beta * q
        return (log_q - m.log()) - beta * q / m
    m = beta * p + (1 - beta) * q
    return log_q - m.log() if name == "jsd" else -p / m


@pytest.mark.parametrize("name,beta", CASES, ids=[f"{n}-{b}" for n, b in CASES])
def test_grad_factor_gives_the_reference_gradient(name, beta):
    """divergences.grad_factor, with the divergence's x, is the reference's autograd gradient."""
    name, beta = divergences.resolve(name, divergences.check(name, beta))
    s, t = make_logits((3, 20), torch.float64)
    x = s.clone().requires_grad_(True)
    fastkd.kd_loss_reference(x, t, 1.0, divergence=name, beta=divergences.beta_argument(name, beta), reduction="sum",
                             t2_scale=False).backward()
    log_q, log_p = F.log_softmax(s, -1), F.log_softmax(t, -1)
    q, p = log_q.exp(), log_p.exp()
    xs = _x(name, beta, q, p, log_q, log_p)
    expected = divergences.grad_factor(name, beta) * q * (xs - (q * xs).sum(-1, keepdim=True))
    torch.testing.assert_close(x.grad, expected, rtol=1e-9, atol=1e-12)
