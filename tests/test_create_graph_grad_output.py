"""The first-order gradient under create_graph=True (gradient penalties, meta-learning) carries
grad_output as the ordinary backward's does: a scalar grad_output other than 1, and per-row
weights for reduction="none", for every fused op family on the fused backends that run here (cpu;
triton on a GPU or in the interpreter; cuda on a GPU).

The existing second-order tests could not see a create_graph backward that dropped grad_output:
their penalties take the gradient of a scalar loss with the default grad_output of 1, and
gradgradcheck only checks that backward's own derivative, consistent with itself either way.
The expected gradient here is the ordinary backward's (the fused kernel's gradient, scaled by
grad_output), a different code path from create_graph's (autograd through the op's composite).
"""

import pytest
import torch

import fastkd
from fastkd.ops import kd as kd_ops
from backend_helpers import backend_params, device_of

BACKENDS = backend_params("kd_forward", kd_ops.TRITON_ERROR, names=("cpu", "triton", "cuda"))


def cases(backend):
    """(name, loss(x, reduction), student, reductions): one small case per fused op family."""
    device = device_of(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64  # triton refuses float64
    gen = torch.Generator().manual_seed(0)

    def r(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * 2).to(device=device, dtype=dtype)

    s, t = r(6, 37), r(6, 37)
    y = torch.tensor([3, -100, 0, 36, 5, 11], device=device)
    log_p = torch.log_softmax(t, -1)
    vals, idx = log_p.topk(8, -1)
    fs, ft = r(6, 3, 4, 5), r(6, 3, 4, 5)
    es, et = r(6, 9), r(6, 11)
    kw = dict(backend=backend)
    return [
        ("kd_loss", lambda x, red: fastkd.kd_loss(x, t, 2.0, labels=y, hard_weight=0.3, reduction=red, **kw), s, ("batchmean", "none")),
        ("dkd_loss", lambda x, red: fastkd.dkd_loss(x, t, y, 3.0, reduction=red, **kw), s, ("batchmean", "none")),
        ("sparse_kd_loss", lambda x, red: fastkd.sparse_kd_loss(x, vals, idx, 2.0, values="logprobs", tail="uniform",
                                                                labels=y, hard_weight=0.3, reduction=red, **kw), s, ("batchmean", "none")),
        ("hint_loss", lambda x, red: fastkd.hint_loss(x, ft, kind="smooth_l1", reduction=red, **kw), fs, ("mean", "none")),
        ("attention_transfer_loss", lambda x, red: fastkd.attention_transfer_loss(x, ft, p=3.0, reduction=red, **kw), fs, ("mean", "none")),
        ("rkd_distance_loss", lambda x, red: fastkd.rkd_distance_loss(x, et, **kw), es, ("scalar",)),
    ]


def gradients(loss_fn, x0, reduction, grad_output):
    """(create_graph gradient, ordinary backward's gradient), both for ``grad_output``."""
    x = x0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(x, reduction), x, grad_output, create_graph=True)
    assert g.requires_grad, "the first-order gradient is a constant to autograd"
    x = x0.clone().requires_grad_(True)
    loss_fn(x, reduction).backward(grad_output)
    return g.detach(), x.grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_create_graph_gradient_is_scaled_by_grad_output(backend):
    for name, fn, x0, reductions in cases(backend):
        for reduction in reductions:
            rows = x0.shape[0]
            if reduction == "none":
                gen = torch.Generator().manual_seed(1)
                grad_output = (torch.rand(rows, generator=gen, dtype=torch.float64) + 0.5).to(x0)
            else:
                grad_output = torch.tensor(0.7, dtype=x0.dtype, device=x0.device)
            got, expected = gradients(fn, x0, reduction, grad_output)
            # The scale must matter, or this case could not tell a dropped grad_output.
            _, unscaled = gradients(fn, x0, reduction, torch.ones_like(grad_output))
            assert (expected - unscaled).abs().max() > 1e-3 * unscaled.abs().max(), f"{name} {reduction}"
            tol = dict(rtol=1e-4, atol=1e-6) if x0.dtype == torch.float32 else dict(rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(got, expected, **tol, msg=lambda m: f"{name}, reduction={reduction}: {m}")
