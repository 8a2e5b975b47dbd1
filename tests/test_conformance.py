"""The contract every public fastkd loss keeps, checked once for all of them from their
specifications (op_specs.py): bad input is a clear error; the registered kernels pass opcheck;
torch.compile(fullgraph=True) matches eager; a gradient penalty (double backward) matches the
reference; repeated backward through a retained graph accumulates; the teacher is a constant (said
once); a call that wants no gradient computes none; the module equals the function; the automatic
backend on CPU is the C++ kernel, and an explicit one that cannot run says why.

Backends: reference and cpu; triton on a GPU or, without one, in the interpreter
(TRITON_INTERPRET=1, set by conftest.py); cuda on a GPU.
"""

import logging
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastkd import _ext
from fastkd.ops import fused_autograd as _fused
from backend_helpers import GPU, device_of, needs_ext
from op_specs import SPECS
ALL = [pytest.param(spec, id=spec.name) for spec in SPECS]
BACKENDS = [p for spec in SPECS for p in spec.backends()]


def _total(loss, weight):
    """A scalar of the loss: a scalar loss times ``weight``; per-row losses weighted 1, 2, 3, ..."""
    if loss.dim() == 0:
        return loss * weight
    return (loss * torch.arange(1.0, loss.numel() + 1, device=loss.device).view(loss.shape)).sum()


# ------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument
# ------------------------------------------------------------------------------------------

BAD = [pytest.param(spec, *case, id=f"{spec.name}-{re.sub(r'[^A-Za-z0-9_]+', '-', case[2][:40])}") for spec in SPECS for case in spec.bad]


@pytest.mark.parametrize("spec,override,exc,message", BAD)
def test_bad_input_is_a_clear_error(spec, override, exc, message):
    with pytest.raises(exc, match=message):
        spec.fn(**dict(spec.bad_base(), **override))


# ------------------------------------------------------------------------------------------
# opcheck of the registered kernels (schema, fake tensors, autograd registration, AOT dispatch)
# ------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", ALL)
def test_opcheck(spec, dtype):
    for kernel, args in spec.kernel_calls("cpu", dtype):
        torch.library.opcheck(getattr(torch.ops.fastkd, kernel).default, args)


@pytest.mark.parametrize("spec,backend", [p for p in BACKENDS if p.values[1] == "triton" and p.values[0].triton_twin])
def test_triton_opcheck(spec, backend):
    # AOT dispatch traces into a triton_op's launcher, and the interpreter would then run the
    # kernel on fake tensors: that check runs on GPU only.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") + (("test_aot_dispatch_dynamic",) if GPU else ())
    kernel, args = spec.kernel_calls(device_of(backend), torch.float32)[0]
    torch.library.opcheck(getattr(torch.ops.fastkd, f"{kernel}_triton").default, args, test_utils=utils)


@pytest.mark.parametrize("spec,backend", [p for p in BACKENDS if p.values[1] == "cuda"])
def test_cuda_opcheck(spec, backend):
    for kernel, args in spec.kernel_calls("cuda", torch.float32):
        torch.library.opcheck(getattr(torch.ops.fastkd, kernel).default, args)


# ------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) matches eager
# ------------------------------------------------------------------------------------------

COMPILE = [pytest.param(spec, None, id=f"{spec.name}-auto", marks=needs_ext) for spec in SPECS]
COMPILE += [p for p in BACKENDS if p.values[1] in ("triton", "cuda") and GPU]


@pytest.mark.parametrize("spec,backend", COMPILE)
def test_torch_compile_fullgraph_matches_eager(spec, backend):
    def step(sample):
        return _total(sample(spec.fn, backend=backend), 1.5)

    # One graph per sample: alike graphs hit the compile cache, one graph of them all would not.
    # The options are constants of the graph (closed over), as in a training step; the reset
    # keeps dynamo from turning an option that differs between samples into a symbolic float.
    for sample in spec.samples(device_of(backend or "cpu"), torch.float32):
        torch._dynamo.reset()
        eager_in, eager_leaves = sample.leaves()
        comp_in, comp_leaves = sample.leaves()
        eager = step(eager_in)
        eager.backward()
        got = torch.compile(lambda: step(comp_in), fullgraph=True)()  # noqa: B023 (called at once)
        got.backward()
        torch.testing.assert_close(got, eager, msg=lambda m: f"{sample.name}: {m}")
        for a, b in zip(comp_leaves, eager_leaves):
            torch.testing.assert_close(a.grad, b.grad, msg=lambda m: f"{sample.name}: {m}")


# ------------------------------------------------------------------------------------------
# Autograd: gradient penalty, retained graph, constant teacher
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,backend", BACKENDS)
def test_gradient_penalty_matches_the_reference(spec, backend):
    """A penalty on the first-order gradient must contribute, on every backend."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)

    def penalised(sample, fn):
        s, leaves = sample.leaves()
        loss = _total(s(fn), 1.0)
        grads = torch.autograd.grad(loss, leaves, create_graph=True)
        assert all(g.requires_grad for g in grads), f"{sample.name}: the first-order gradient is a constant to autograd"
        (loss + 10 * sum(g.pow(2).sum() for g in grads)).backward()
        return [leaf.grad for leaf in leaves]

    for sample in spec.contract(device_of(backend), dtype):
        got = penalised(sample, lambda *a, **k: spec.fn(*a, backend=backend, **k))
        expected = penalised(sample, spec.reference)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{sample.name}: {m}")


@pytest.mark.parametrize("spec,backend", BACKENDS)
def test_repeated_backward_through_a_retained_graph_accumulates(spec, backend):
    for sample in spec.contract(device_of(backend), torch.float32):
        for weight in (1.0, 3.0):  # 1.0: the backward hands out the kernel's buffer unscaled
            once, once_leaves = sample.leaves()
            first = once(spec.fn, backend=backend)
            _total(first, weight).backward()
            again, leaves = sample.leaves()
            loss = _total(again(spec.fn, backend=backend), weight)
            for _ in range(3):
                loss.backward(retain_graph=True)
            for a, b in zip(leaves, once_leaves):
                torch.testing.assert_close(a.grad, 3 * b.grad, msg=lambda m: f"{sample.name}, weight {weight}: {m}")
            if first.dim() > 0:
                break  # per-row losses are weighted 1, 2, 3, ... either way


@pytest.mark.parametrize("spec,backend", BACKENDS)
def test_teacher_requiring_grad_is_constant_and_said_once(spec, backend, caplog, monkeypatch):
    monkeypatch.setattr(_fused, "_said", set())
    sample = spec.samples(device_of(backend), torch.float32)[0]
    sample = sample.with_teacher(lambda t: t.detach().clone().requires_grad_(True))
    with caplog.at_level(logging.WARNING, logger="fastkd"):
        for _ in range(2):
            s, leaves = sample.leaves()
            _total(s(spec.fn, backend=backend), 1.0).backward()
            assert all(leaf.grad is not None for leaf in leaves)
    assert all(t.grad is None for t in sample.teachers() if t is not None)
    said = [r.getMessage() for r in caplog.records if "teacher is treated as a constant" in r.getMessage()]
    assert len(said) == 1 and spec.name in said[0], said


class _Calls(TorchDispatchMode):
    """Records the ops a call dispatches (by name) and the compute_grad the fastkd ones get."""

    def __init__(self):
        super().__init__()
        self.names, self.compute_grad = set(), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        names = [a.name for a in func._schema.arguments]
        if func.namespace == "fastkd" and "compute_grad" in names:
            self.compute_grad.add(args[names.index("compute_grad")])
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------------------------------
# No gradient wanted, the module, the backend choice
# ------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("spec", ALL)
def test_no_gradient_wanted_skips_the_gradient(spec):
    for sample in spec.samples("cpu", torch.float32):
        sample, _ = sample.leaves()
        with torch.no_grad(), _Calls() as calls:
            got = sample(spec.fn, backend="cpu")
        assert calls.compute_grad == {False}, f"{sample.name}: compute_grad {calls.compute_grad} under no_grad"
        torch.testing.assert_close(got, sample(spec.reference), msg=lambda m: f"{sample.name}: {m}")
    for kernel, args in spec.kernel_calls("cpu", torch.float32):
        if args[-1] is False:
            out = getattr(torch.ops.fastkd, kernel)(*args)
            assert all(g.numel() == 0 for g in out[1:]), f"{kernel} computed a gradient nobody asked for"


@needs_ext
@pytest.mark.parametrize("spec", ALL)
def test_module_matches_function(spec):
    module, inputs, call, shown = spec.module()
    torch.testing.assert_close(module(*inputs), call(spec.fn))
    for fragment in shown:
        assert fragment in repr(module), (fragment, repr(module))


@needs_ext
@pytest.mark.parametrize("spec", ALL)
def test_auto_backend_on_cpu_is_the_cpu_kernel(spec):
    sample = spec.samples("cpu", torch.float32)[0]
    with _Calls() as calls:
        sample(spec.fn)
    assert f"fastkd::{spec.entry or spec.kernels[0]}" in calls.names, sorted(calls.names)


@pytest.mark.parametrize("spec", ALL)
def test_explicit_backend_that_cannot_run_says_why(spec):
    sample = spec.samples("cpu", torch.float32)[0]
    with pytest.raises(RuntimeError, match=rf"fastkd.{spec.name}: backend 'cuda' cannot run this call: .*CUDA tensors, got a cpu tensor"):
        sample(spec.fn, backend="cuda")


@needs_ext
@pytest.mark.parametrize("spec", ALL)
def test_cuda_kernels_are_registered_when_built_with_cuda(spec):
    for kernel in spec.kernels:
        assert _ext.has_kernel(kernel, "CPU")
        assert _ext.has_kernel(kernel, "CUDA") == torch.ops.fastkd.built_with_cuda()
