"""One specification per public loss, in the manner of PyTorch's OpInfo: what test_conformance.py
needs to check the contract every fastkd op shares, without a copy of each test per family.

An OpSpec holds, for one op: its public function (and with it the float64 reference,
``fastkd.functional.<name>_reference``), the registered kernels behind it, which backends run it
here, small sample calls, the kernels' own calls for opcheck, its module form, and its bad inputs
with the message each must raise. The per-family test files keep only what is specific to an op's
math (reference formulas, accuracy grids, numerics at the edges).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import pytest
import torch

import fastkd
from fastkd import functional as F_
from fastkd.ops import dkd as dkd_ops
from fastkd.ops import feature as feature_ops
from fastkd.ops import kd as kd_ops
from fastkd.ops import table
from fastkd.ops import sparse_kd as sparse_ops
from backend_helpers import backend_params
from feature_helpers import make_features, make_maps
from kd_helpers import make_labels, make_logits
from relational_helpers import make_embeddings
from sparse_kd_helpers import TAILS, make_dense, make_sparse, top_k

# ------------------------------------------------------------------------------------------
# A sample call
# ------------------------------------------------------------------------------------------


def _get(container, key):
    return container[key[0]][key[1]] if isinstance(key, tuple) else container[key]


def _set(container, key, value):
    if isinstance(key, tuple):
        inner = list(container[key[0]])
        inner[key[1]] = value
        container[key[0]] = inner
    else:
        container[key] = value


@dataclass(frozen=True)
class Sample:
    """One call of a public op: ``fn(*args, **kwargs)``. ``grad``: the differentiable inputs, each a
    position in ``args``, a name in ``kwargs`` or (position, index) into a list argument; ``teacher``:
    the teacher's tensors, the same way."""

    name: str
    args: tuple
    kwargs: dict = field(default_factory=dict)
    grad: tuple = (0,)
    teacher: tuple = (1,)

    def _where(self, key):
        return "kwargs" if isinstance(key, str) else "args"

    def leaves(self, requires_grad: bool = True) -> tuple["Sample", list]:
        """A copy whose differentiable inputs are fresh leaves, and those leaves."""
        parts = {"args": list(self.args), "kwargs": dict(self.kwargs)}
        out = []
        for key in self.grad:
            part = parts[self._where(key)]
            leaf = _get(part, key).detach().clone().requires_grad_(requires_grad)
            _set(part, key, leaf)
            out.append(leaf)
        return replace(self, args=tuple(parts["args"]), kwargs=parts["kwargs"]), out

    def with_teacher(self, fn: Callable) -> "Sample":
        """A copy whose teacher tensors are ``fn(tensor)``."""
        parts = {"args": list(self.args), "kwargs": dict(self.kwargs)}
        for key in self.teacher:
            part = parts[self._where(key)]
            _set(part, key, fn(_get(part, key)))
        return replace(self, args=tuple(parts["args"]), kwargs=parts["kwargs"])

    def teachers(self) -> list:
        parts = {"args": list(self.args), "kwargs": dict(self.kwargs)}
        return [_get(parts[self._where(key)], key) for key in self.teacher]

    def __call__(self, fn: Callable, **extra):
        return fn(*self.args, **{**self.kwargs, **extra})


# ------------------------------------------------------------------------------------------
# The specification
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpSpec:
    """``samples(device, dtype)``: small calls covering the op's options (reductions, labels,
    ensembles, ...), with at least one per-row (``reduction="none"``) call where the op has one.
    ``kernel_calls(device, dtype)``: (kernel name, args) of the registered kernel(s), the last
    argument ``compute_grad``, False in at least one; the first call is the one a Triton twin gets. ``module()``: (module, its forward's inputs, the function call it must
    equal, fragments its repr shows). ``bad``: (overrides of ``bad_base()``, exception, message)."""

    name: str
    kernels: tuple
    triton_error: Optional[str]
    samples: Callable
    kernel_calls: Callable
    bad_base: Callable
    bad: list
    module: Callable
    # The op the public function dispatches to (fused_linear_kd_loss: its chunk loop, which calls
    # kd_forward), and whether its kernel calls have a Triton twin (``<kernel>_triton``) to opcheck.
    entry: Optional[str] = None
    triton_twin: bool = True
    # How many of the samples the autograd contract tests take (None: all): the first ones are a
    # scalar and a per-row loss; the rest (divergences, the other value kind) add only run time.
    contract_samples: Optional[int] = None
    has_reference_backend: bool = True

    def __str__(self) -> str:
        return self.name

    @property
    def fn(self) -> Callable:
        return getattr(fastkd, self.name)

    @property
    def reference(self) -> Callable:
        return getattr(F_, f"{self.name}_reference")

    def contract(self, device, dtype) -> list:
        return self.samples(device, dtype)[: self.contract_samples]

    def backends(self) -> list:
        """The backends of this op as (spec, backend) pytest params, skipped with the reason where
        one cannot run."""
        (kernel,) = self.kernels
        names = ("reference",) * self.has_reference_backend + ("cpu", "triton", "cuda")
        return [pytest.param(self, *p.values, marks=p.marks, id=f"{self}-{p.id}") for p in backend_params(kernel, self.triton_error, names)]


# ------------------------------------------------------------------------------------------
# kd_loss (every divergence, ensembles of teachers)
# ------------------------------------------------------------------------------------------


def _ensemble(shape, m=3, dtype=torch.float32, seed=5, device="cpu"):
    s, _ = make_logits(shape, dtype, seed=seed, device=device)
    return s, torch.stack([make_logits(shape, dtype, seed=seed + 1 + i, device=device)[1] for i in range(m)])


def kd_samples(device, dtype):
    s, t = make_logits((2, 3, 30), dtype, device=device)
    y = make_labels((2, 3), 30, ignored=(3,), device=device)
    _, te = _ensemble((2, 3, 30), 3, dtype, device=device)
    w = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)
    opts = dict(labels=y, hard_weight=0.25)
    return [
        Sample("kl-batchmean", (s, t, 2.0), dict(opts)),
        Sample("kl-none", (s, t, 2.0), dict(opts, reduction="none")),
        Sample("kl-ensemble", (s, te, 2.0), dict(opts, teacher_weights=w)),
        Sample("jsd-ensemble", (s, te, 2.0), dict(opts, divergence="jsd", beta=0.5, teacher_weights=w)),
        Sample("jsd", (s, t, 2.0), dict(opts, divergence="jsd", beta=0.5)),
        Sample("skew_reverse_kl-ensemble", (s, te, 2.0), dict(opts, divergence="skew_reverse_kl", beta=0.1, teacher_weights=w)),
        Sample("skew_reverse_kl", (s, t, 2.0), dict(opts, divergence="skew_reverse_kl", beta=0.1)),
        Sample("hellinger-ensemble", (s, te, 2.0), dict(opts, divergence="hellinger", teacher_weights=w)),
    ]


def kd_kernel_calls(device, dtype):
    s, t = make_logits((5, 33), dtype, device=device)
    _, te = _ensemble((5, 33), 3, dtype, device=device)
    y = make_labels((5,), 33, ignored=(3,), device=device)
    third = torch.full((3,), 1.0 / 3, device=device)
    out = []
    # (teacher, weights, divergence, beta) x (labels, hard_weight, reduction)
    for teacher, weights, div, beta in [(t, None, "kl", 0.0), (t, None, "reverse_kl", 0.0), (t, None, "jsd", 0.3), (te, third, "tvd", 0.0),
                                        (te[:2], None, "skew_kl", 0.1), (t, None, "skew_reverse_kl", 0.2), (te, third, "kl", 0.0),
                                        (t, None, "hellinger", 0.0)]:
        grid = [(None, 0.0, "batchmean", True), (y, 0.4, "none", True), (y, 0.0, "sum", False)]
        if teacher is t and div == "kl":
            grid = [(y, 0.25, "batchmean", True)] + grid + [(y, 1.0, "batchmean", True)]
        for labels, hard_weight, reduction, compute_grad in grid:
            args = (s.clone().requires_grad_(compute_grad), teacher, labels, weights, div, beta, 2.0, hard_weight, -100, reduction, True, compute_grad)
            out.append(("kd_forward", args))
    return out


_S, _T = make_logits((4, 10))
_E = torch.stack([_T, _T, _T])
KD_BAD = [
    (dict(student_logits=[[1.0]]), TypeError, "student_logits must be a torch.Tensor"),
    (dict(student_logits=torch.ones(4, 10, dtype=torch.int64)), TypeError, "student_logits must be a floating-point tensor"),
    (dict(teacher_logits=torch.ones(4, 10, dtype=torch.int32)), TypeError, "teacher_logits must be a floating-point tensor"),
    (dict(teacher_logits=torch.ones(4, 11)), ValueError, "teacher_logits has vocabulary size 11 but student_logits has 10"),
    (dict(teacher_logits=torch.ones(5, 10)), ValueError, r"teacher_logits shape \(5, 10\) must equal student_logits shape \(4, 10\)"),
    (dict(student_logits=torch.tensor(1.0), teacher_logits=torch.tensor(1.0)), ValueError, "student_logits must have at least one dimension"),
    (dict(student_logits=torch.ones(0, 10), teacher_logits=torch.ones(0, 10)), ValueError, "empty batch"),
    (dict(student_logits=torch.ones(4, 0), teacher_logits=torch.ones(4, 0)), ValueError, "empty vocabulary"),
    (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0, got 0.0"),
    (dict(temperature=-2), ValueError, "temperature must be a finite number > 0, got -2"),
    (dict(temperature=math.inf), ValueError, "temperature must be a finite number > 0"),
    (dict(temperature="2"), TypeError, "temperature must be a real number"),
    (dict(hard_weight=1.5, labels=torch.zeros(4, dtype=torch.int64)), ValueError, r"hard_weight must be in \[0, 1\], got 1.5"),
    (dict(hard_weight=-0.1, labels=torch.zeros(4, dtype=torch.int64)), ValueError, r"hard_weight must be in \[0, 1\]"),
    (dict(hard_weight=0.5), ValueError, "hard_weight=0.5 > 0 needs labels"),
    (dict(labels=torch.zeros(4, dtype=torch.int32)), TypeError, "labels must be an int64 tensor, got torch.int32"),
    (dict(labels=torch.zeros(5, dtype=torch.int64)), ValueError, r"labels shape \(5,\) must equal student_logits' leading shape \(4,\)"),
    (dict(labels=[0, 1, 2, 3]), TypeError, "labels must be a torch.Tensor or None"),
    (dict(labels=torch.tensor([0, 1, -1, 3])), ValueError, r"labels holds -1, outside \[0, 10\)"),
    (dict(reduction="mean"), ValueError, "reduction must be one of 'none', 'sum', 'batchmean', got 'mean'"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    (dict(t2_scale="yes"), TypeError, "t2_scale must be a bool"),
    (dict(teacher_logits=_T.to("meta")), ValueError, "teacher_logits is on meta but student_logits is on cpu"),
    (dict(labels=torch.zeros(4, dtype=torch.int64, device="meta")), ValueError, "labels is on meta but student_logits is on cpu"),
    # divergences and ensembles
    (dict(divergence="js"), ValueError, f"divergence must be one of {', '.join(map(repr, kd_ops.divergences.DIVERGENCES))}, got 'js'"),
    (dict(divergence="kl", beta=0.5), ValueError, r"beta=0.5 was given but divergence='kl' takes no beta"),
    (dict(divergence="reverse_kl", beta=0.1), ValueError, r"beta=0.1 was given but divergence='reverse_kl' takes no beta"),
    (dict(divergence="tvd", beta=0.0), ValueError, r"beta=0.0 was given but divergence='tvd' takes no beta"),
    (dict(divergence="jsd", beta=1.5), ValueError, r"beta must be in \[0, 1\] for divergence='jsd', got 1.5"),
    (dict(divergence="jsd", beta=-0.1), ValueError, r"beta must be in \[0, 1\] for divergence='jsd', got -0.1"),
    (dict(divergence="skew_kl", beta=1.0), ValueError, r"beta must be in \[0, 1\) for divergence='skew_kl', got 1.0"),
    (dict(divergence="skew_reverse_kl", beta=math.nan), ValueError, r"beta must be in \[0, 1\) for divergence='skew_reverse_kl', got nan"),
    (dict(divergence="jsd", beta="0.5"), TypeError, r"beta must be a real number \(divergence='jsd'\), got str"),
    (dict(teacher_logits=torch.ones(2, 5, 10)), ValueError, r"teacher_logits shape \(2, 5, 10\) must equal student_logits shape \(4, 10\) \(or \[M, 4, 10\]"),
    (dict(teacher_logits=torch.ones(0, 4, 10)), ValueError, r"ensemble of 0 teachers"),
    (dict(teacher_logits=_E, teacher_weights=torch.tensor([0.5, 0.5])), ValueError, "teacher_weights has 2 weights but teacher_logits holds 3 teachers"),
    (dict(teacher_logits=_E, teacher_weights=torch.tensor([0.5, 0.5, 0.5])), ValueError, r"teacher_weights must sum to 1, got \[0.5, 0.5, 0.5\]"),
    (dict(teacher_logits=_E, teacher_weights=torch.tensor([1.5, -0.5, 0.0])), ValueError, "teacher_weights must be finite and non-negative"),
    (dict(teacher_logits=_E, teacher_weights=torch.tensor([math.nan, 0.5, 0.5])), ValueError, "teacher_weights must be finite and non-negative"),
    (dict(teacher_logits=_E, teacher_weights=torch.tensor([[1.0, 0.0, 0.0]])), ValueError, r"teacher_weights must be 1-D \[M\], got shape \(1, 3\)"),
    (dict(teacher_logits=_E, teacher_weights=torch.tensor([1, 0, 0])), TypeError, "teacher_weights must be a floating-point tensor, got torch.int64"),
    (dict(teacher_logits=_E, teacher_weights=[1.0, 0.0, 0.0]), TypeError, "teacher_weights must be a torch.Tensor or None, got list"),
    (dict(teacher_weights=torch.tensor([1.0])), ValueError, "teacher_weights were given but teacher_logits is a single teacher"),
]


def kd_module():
    s, t = make_logits((5, 40))
    y = make_labels((5,), 40, ignored=(2,))
    module = fastkd.nn.KDLoss(temperature=3.0, hard_weight=0.2, backend="cpu")
    return module, (s, t, y), Sample("", (s, t, 3.0), dict(labels=y, hard_weight=0.2, backend="cpu")), ["temperature=3.0"]


KD = OpSpec("kd_loss", ("kd_forward",), kd_ops.TRITON_ERROR, kd_samples, kd_kernel_calls,
            lambda: dict(student_logits=_S, teacher_logits=_T, temperature=2.0), KD_BAD, kd_module, contract_samples=2)


# ------------------------------------------------------------------------------------------
# dkd_loss
# ------------------------------------------------------------------------------------------


def dkd_samples(device, dtype):
    s, t = make_logits((2, 3, 30), dtype, device=device)
    y = make_labels((2, 3), 30, ignored=(3,), device=device)
    return [
        Sample("batchmean", (s, t, y, 2.0), dict(alpha=0.5, beta=4.0)),
        Sample("none", (s, t, y, 2.0), dict(alpha=0.5, beta=4.0, reduction="none")),
    ]


def dkd_kernel_calls(device, dtype):
    s, t = make_logits((5, 33), dtype, device=device)
    y = make_labels((5,), 33, ignored=(3,), device=device)
    return [("dkd_forward", (s.clone().requires_grad_(compute_grad), t, y, 2.0, 1.0, 8.0, -100, reduction, compute_grad))
            for reduction, compute_grad in (("batchmean", True), ("none", True), ("sum", False))]


_Y = torch.tensor([1, 2, 3, 4])
DKD_BAD = [
    (dict(student_logits=[[1.0]]), TypeError, "student_logits must be a torch.Tensor"),
    (dict(teacher_logits=torch.ones(4, 10, dtype=torch.int32)), TypeError, "teacher_logits must be a floating-point tensor"),
    (dict(teacher_logits=torch.ones(4, 11)), ValueError, "teacher_logits has vocabulary size 11 but student_logits has 10"),
    (dict(student_logits=torch.ones(4, 1), teacher_logits=torch.ones(4, 1), labels=torch.zeros(4, dtype=torch.int64)), ValueError,
     "student_logits has 1 class .*DKD needs at least 2"),
    (dict(student_logits=torch.ones(0, 10), teacher_logits=torch.ones(0, 10)), ValueError, "empty batch"),
    (dict(labels=None), ValueError, "labels are required .DKD is defined by the target class"),
    (dict(labels=torch.zeros(4, dtype=torch.int32)), TypeError, "labels must be an int64 tensor, got torch.int32"),
    (dict(labels=torch.zeros(5, dtype=torch.int64)), ValueError, r"labels shape \(5,\) must equal student_logits' leading shape \(4,\)"),
    (dict(labels=[0, 1, 2, 3]), TypeError, "labels must be a torch.Tensor, got list"),
    (dict(labels=torch.tensor([0, 1, -1, 3])), ValueError, r"labels holds -1, outside \[0, 10\)"),
    (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0, got 0.0"),
    (dict(temperature="4"), TypeError, "temperature must be a real number"),
    (dict(alpha=-0.5), ValueError, r"alpha must be in \[0, inf\], got -0.5"),
    (dict(beta=math.inf), ValueError, "beta must be a finite number >= 0, got inf"),
    (dict(beta=math.nan), ValueError, "beta must be a number, got nan"),
    (dict(alpha="1"), TypeError, "alpha must be a real number, got str"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an integer"),
    (dict(reduction="mean"), ValueError, "reduction must be one of 'none', 'sum', 'batchmean', got 'mean'"),
    (dict(backend="fast"), ValueError, "backend='fast' is not a backend"),
    (dict(teacher_logits=_T.to("meta")), ValueError, "teacher_logits is on meta but student_logits is on cpu"),
]


def dkd_module():
    s, t = make_logits((5, 40))
    y = make_labels((5,), 40, ignored=(2,))
    module = fastkd.nn.DKDLoss(temperature=3.0, alpha=0.5, beta=2.0, backend="cpu")
    return module, (s, t, y), Sample("", (s, t, y, 3.0), dict(alpha=0.5, beta=2.0, backend="cpu")), ["alpha=0.5, beta=2.0"]


DKD = OpSpec("dkd_loss", ("dkd_forward",), dkd_ops.TRITON_ERROR, dkd_samples, dkd_kernel_calls,
             lambda: dict(student_logits=_S, teacher_logits=_T, labels=_Y, temperature=4.0), DKD_BAD, dkd_module)


# ------------------------------------------------------------------------------------------
# sparse_kd_loss (both value kinds and tails)
# ------------------------------------------------------------------------------------------


def sparse_samples(device, dtype):
    y = make_labels((2, 3), 30, ignored=(3,), device=device)
    out = []
    for values, tail in TAILS:
        s, vals, idx = make_sparse((2, 3, 30), 5, dtype, values=values, device=device)
        opts = dict(values=values, tail=tail, labels=y, hard_weight=0.25)
        out += [Sample(f"{values}-batchmean", (s, vals, idx, 2.0), dict(opts)),
                Sample(f"{values}-none", (s, vals, idx, 2.0), dict(opts, reduction="none"))]
    return [out[0], out[3], out[2], out[1]]  # the first two: both value kinds, a scalar and a per-row loss


def sparse_kernel_calls(device, dtype):
    y = make_labels((5,), 33, ignored=(3,), device=device)
    out = []
    for values, tail in TAILS:
        s, vals, idx = make_sparse((5, 33), 6, dtype, values, index_dtype=torch.int32 if dtype == torch.bfloat16 else torch.int64, device=device)
        grid = [(y, 0.25, "batchmean", True), (None, 0.0, "batchmean", True), (y, 0.4, "none", True), (y, 0.0, "sum", False), (y, 1.0, "batchmean", True)]
        for labels, hard_weight, reduction, compute_grad in grid:
            args = (s.clone().requires_grad_(compute_grad), vals, idx, labels, values, tail, 2.0, hard_weight, -100, reduction, True, compute_grad)
            out.append(("sparse_kd_forward", args))
    return out


_SS, _VALS, _IDX = make_sparse((4, 10), 3)
_LP, _LP_IDX = top_k(make_dense((4, 10))[1], 3, "logprobs")


def _with(t, pos, value):
    t = t.clone()
    t[pos] = value
    return t


SPARSE_BAD = [
    (dict(student_logits=[[1.0]]), TypeError, "student_logits must be a torch.Tensor"),
    (dict(student_logits=torch.ones(4, 10, dtype=torch.int64)), TypeError, "student_logits must be a floating-point tensor"),
    (dict(teacher_values=torch.ones(4, 3, dtype=torch.int32)), TypeError, "teacher_values must be a floating-point tensor"),
    (dict(teacher_indices=[[0, 1, 2]] * 4), TypeError, "teacher_indices must be a torch.Tensor"),
    (dict(teacher_indices=_IDX.float()), TypeError, "teacher_indices must be an int64 or int32 tensor, got torch.float32"),
    (dict(teacher_indices=_IDX[:, :2]), ValueError, r"teacher_indices shape \(4, 2\) must equal teacher_values shape \(4, 3\)"),
    (dict(teacher_values=_VALS[:3], teacher_indices=_IDX[:3]), ValueError,
     r"teacher_values shape \(3, 3\) must be student_logits' leading shape \(4,\) followed by k"),
    (dict(teacher_values=_VALS[:, :0], teacher_indices=_IDX[:, :0]), ValueError, "teacher_values has k = 0 entries per row"),
    (dict(teacher_values=torch.zeros(4, 11), teacher_indices=torch.zeros(4, 11, dtype=torch.int64)), ValueError,
     "k = 11 entries per row but the vocabulary has V = 10"),
    (dict(student_logits=torch.ones(0, 10), teacher_values=_VALS[:0], teacher_indices=_IDX[:0]), ValueError, "empty batch"),
    (dict(student_logits=torch.tensor(1.0)), ValueError, "student_logits must have at least one dimension"),
    (dict(teacher_indices=_with(_IDX, (2, 1), 10)), ValueError, r"teacher_indices holds 10 in row 2, outside \[0, 10\)"),
    (dict(teacher_indices=_with(_IDX, (0, 0), -3)), ValueError, r"teacher_indices holds -3 in row 0, outside \[0, 10\)"),
    (dict(teacher_indices=_with(_IDX, (3, 2), _IDX[3, 0])), ValueError, f"teacher_indices repeats {int(_IDX[3, 0])} in row 3"),
    (dict(values="probs"), ValueError, "values must be one of 'logits', 'logprobs', got 'probs'"),
    (dict(tail="zero"), ValueError, "tail must be one of 'renormalize', 'uniform', got 'zero'"),
    (dict(tail="uniform"), ValueError, "tail='uniform' needs values='logprobs'"),
    (dict(values="logprobs", tail="uniform", teacher_values=_with(_LP, (1, 0), 0.0), teacher_indices=_LP_IDX), ValueError,
     r"teacher_values row 1 keeps probability mass sum\(exp\(values\)\) = 1\.\d+ > 1"),
    (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0, got 0.0"),
    (dict(temperature="2"), TypeError, "temperature must be a real number"),
    (dict(hard_weight=0.5), ValueError, "hard_weight=0.5 > 0 needs labels"),
    (dict(hard_weight=1.5, labels=torch.zeros(4, dtype=torch.int64)), ValueError, r"hard_weight must be in \[0, 1\], got 1.5"),
    (dict(labels=torch.zeros(4, dtype=torch.int32)), TypeError, "labels must be an int64 tensor, got torch.int32"),
    (dict(labels=torch.tensor([0, 1, 10, 3])), ValueError, r"labels holds 10, outside \[0, 10\)"),
    (dict(reduction="mean"), ValueError, "reduction must be one of 'none', 'sum', 'batchmean', got 'mean'"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    (dict(t2_scale="yes"), TypeError, "t2_scale must be a bool"),
    (dict(teacher_values=_VALS.to("meta")), ValueError, "teacher_values is on meta but student_logits is on cpu"),
    (dict(teacher_indices=_IDX.to("meta")), ValueError, "teacher_indices is on meta but student_logits is on cpu"),
]


def sparse_module():
    s, vals, idx = make_sparse((5, 40), 6, values="logprobs")
    y = make_labels((5,), 40, ignored=(2,))
    opts = dict(values="logprobs", tail="uniform", hard_weight=0.2, backend="cpu")
    module = fastkd.nn.SparseKDLoss(temperature=3.0, **opts)
    return module, (s, vals, idx, y), Sample("", (s, vals, idx, 3.0), dict(opts, labels=y)), ["tail='uniform'"]


SPARSE = OpSpec("sparse_kd_loss", ("sparse_kd_forward",), sparse_ops.TRITON_ERROR, sparse_samples, sparse_kernel_calls,
                lambda: dict(student_logits=_SS, teacher_values=_VALS, teacher_indices=_IDX, temperature=2.0), SPARSE_BAD, sparse_module,
                contract_samples=2)


# ------------------------------------------------------------------------------------------
# fused_linear_kd_loss (the kd kernels, chunk by chunk through the output layer)
# ------------------------------------------------------------------------------------------


def linear_inputs(lead, h, ht, v, dtype=torch.float32, bias=True, seed=0, device="cpu"):
    """student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype).to(device)

    return dict(
        student_hidden=r(*lead, h), student_weight=r(v, h, s=h**-0.5), student_bias=r(v, s=0.1) if bias else None,
        teacher_hidden=r(*lead, ht), teacher_weight=r(v, ht, s=ht**-0.5 * 2), teacher_bias=r(v, s=0.1) if bias else None,
    )


def linear_samples(device, dtype):
    x = linear_inputs((2, 3), 8, 10, 30, dtype, device=device)
    y = make_labels((2, 3), 30, ignored=(3,), device=device)
    args = (x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], 2.0)
    opts = dict(student_bias=x["student_bias"], teacher_bias=x["teacher_bias"], labels=y, hard_weight=0.25, chunk_size=4)
    keys = dict(grad=(0, 1, "student_bias"), teacher=(2, 3, "teacher_bias"))
    return [Sample("kl-batchmean", args, dict(opts), **keys),
            Sample("jsd-none", args, dict(opts, divergence="jsd", beta=0.3, reduction="none"), **keys)]


def linear_kernel_calls(device, dtype):
    out = []
    # (the divergence only changes which kd_forward kernel the chunk loop calls)
    for bias, labels, reduction, div, beta, compute_grad in [(True, True, "sum", "kl", 0.0, True), (False, False, "none", "jsd", 0.3, True),
                                                              (True, True, "batchmean", "kl", 0.0, False)]:
        x = linear_inputs((6,), 5, 4, 33, dtype, bias=bias, device=device)
        y = make_labels((6,), 33, device=device) if labels else None
        args = (x["student_hidden"].requires_grad_(compute_grad), x["student_weight"].requires_grad_(compute_grad), x["student_bias"],
                x["teacher_hidden"], x["teacher_weight"], x["teacher_bias"], y, 2.0, 0.25 if labels else 0.0, -100, reduction, True,
                div, beta, 0.0 if bias else 1.5, 0.0 if labels else 2.0, 4, "cpu", compute_grad)  # soft-caps (0: none)
        out.append(("fused_linear_kd_forward", args))
    return out


_X = linear_inputs((4,), 6, 5, 10)
LINEAR_BAD = [
    (dict(student_weight=torch.ones(10, 7)), ValueError, r"student_hidden's last dimension 6 must equal student_weight's second dimension 7"),
    (dict(teacher_weight=torch.ones(10, 6)), ValueError, r"teacher_hidden's last dimension 5 must equal teacher_weight's second dimension 6"),
    (dict(teacher_weight=torch.ones(11, 5), teacher_bias=None), ValueError, "teacher_weight has vocabulary size 11 but student_weight has 10"),
    (dict(student_weight=torch.ones(60)), ValueError, "student_weight must have at least 2 dimensions"),
    (dict(student_bias=torch.ones(9)), ValueError, r"student_bias must be \[V\] = \[10\]"),
    (dict(teacher_hidden=torch.ones(3, 5)), ValueError, "teacher_hidden's leading shape"),
    (dict(student_hidden=torch.ones(4, 6, dtype=torch.int64)), TypeError, "student_hidden must be a floating-point tensor"),
    (dict(student_weight=torch.ones(10, 6, device="meta")), ValueError, "student_weight is on meta but student_hidden is on cpu"),
    (dict(teacher_hidden=torch.ones(4, 5, device="meta")), ValueError, "teacher_hidden is on meta"),
    (dict(labels=torch.tensor([0, 1, 2, 10])), ValueError, r"labels holds 10, outside \[0, 10\)"),
    (dict(labels=torch.zeros(5, dtype=torch.int64)), ValueError, "labels shape"),
    (dict(chunk_size=0), ValueError, "chunk_size must be >= 1"),
    (dict(chunk_size=2.5), TypeError, "chunk_size must be an integer"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(hard_weight=0.5), ValueError, "needs labels"),
]


def linear_module():
    x = linear_inputs((5,), 6, 4, 40, bias=False)
    y = make_labels((5,), 40, ignored=(2,))
    module = fastkd.nn.FusedLinearKDLoss(temperature=3.0, hard_weight=0.2, chunk_size=2, backend="cpu")
    student_head, teacher_head = torch.nn.Linear(6, 40, bias=False), torch.nn.Linear(4, 40, bias=False)
    with torch.no_grad():
        student_head.weight.copy_(x["student_weight"])
        teacher_head.weight.copy_(x["teacher_weight"])
    call = Sample("", (x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], 3.0),
                  dict(labels=y, hard_weight=0.2, chunk_size=2, backend="cpu"))
    return module, (x["student_hidden"], student_head, x["teacher_hidden"], teacher_head, y), call, ["chunk_size=2"]


LINEAR = OpSpec("fused_linear_kd_loss", ("kd_forward",), kd_ops.TRITON_ERROR, linear_samples, linear_kernel_calls,
                lambda: dict(_X, temperature=2.0), LINEAR_BAD, linear_module, entry="fused_linear_kd_forward", triton_twin=False)


# ------------------------------------------------------------------------------------------
# fused_linear_sparse_kd_loss (the sparse kernels, chunk by chunk through the output layer)
# ------------------------------------------------------------------------------------------


def linear_sparse_inputs(lead, h, v, k, dtype=torch.float32, values="logits", bias=True, seed=0, device="cpu", scale=1.0):
    """student_hidden, student_weight, student_bias, and the top-k teacher_values, teacher_indices
    of a random teacher (log-probabilities for values="logprobs")."""
    x = linear_inputs(lead, h, h, v, dtype, bias, seed, device)
    vals, idx = top_k(make_dense((*lead, v), seed=seed + 1)[1], k, values, dtype)
    return dict(student_hidden=x["student_hidden"] * scale, student_weight=x["student_weight"], student_bias=x["student_bias"],
                teacher_values=vals.to(device), teacher_indices=idx.to(device))


LINEAR_SPARSE_ARGS = ("student_hidden", "student_weight", "teacher_values", "teacher_indices")


def linear_sparse_samples(device, dtype):
    y = make_labels((2, 3), 30, ignored=(3,), device=device)
    out = []
    for (values, tail), reduction, cap in zip(TAILS, ("batchmean", "none"), (None, 2.0)):
        x = linear_sparse_inputs((2, 3), 8, 30, 5, dtype, values, device=device)
        opts = dict(student_bias=x["student_bias"], values=values, tail=tail, labels=y, hard_weight=0.25, reduction=reduction,
                    student_softcap=cap, chunk_size=4)
        out.append(Sample(f"{values}-{reduction}", tuple(x[k] for k in LINEAR_SPARSE_ARGS) + (2.0,), opts, grad=(0, 1, "student_bias"), teacher=(2,)))
    return out


def linear_sparse_kernel_calls(device, dtype):
    out = []
    for (values, tail), bias, labels, reduction, cap, compute_grad in [
            (TAILS[0], True, True, "sum", 0.0, True), (TAILS[1], False, False, "none", 1.5, True), (TAILS[1], True, True, "batchmean", 0.0, False)]:
        x = linear_sparse_inputs((6,), 5, 33, 4, dtype, values, bias, device=device)
        y = make_labels((6,), 33, device=device) if labels else None
        args = (x["student_hidden"].requires_grad_(compute_grad), x["student_weight"].requires_grad_(compute_grad), x["student_bias"],
                x["teacher_values"], x["teacher_indices"], y, values, tail, 2.0, 0.25 if labels else 0.0, -100, reduction, True, cap, 4,
                "cpu", compute_grad)
        out.append(("fused_linear_sparse_kd_forward", args))
    return out


_XS = linear_sparse_inputs((4,), 6, 10, 3)
LINEAR_SPARSE_BAD = [
    (dict(student_weight=torch.ones(10, 7)), ValueError, r"student_hidden's last dimension 6 must equal student_weight's second dimension 7"),
    (dict(student_bias=torch.ones(9)), ValueError, r"student_bias must be \[V\] = \[10\]"),
    (dict(teacher_indices=_with(_XS["teacher_indices"], (2, 1), 10)), ValueError, r"teacher_indices holds 10 in row 2, outside \[0, 10\)"),
    (dict(teacher_indices=_XS["teacher_indices"][:, :2]), ValueError, r"teacher_indices shape \(4, 2\) must equal teacher_values shape \(4, 3\)"),
    (dict(teacher_values=_XS["teacher_values"][:3], teacher_indices=_XS["teacher_indices"][:3]), ValueError,
     r"teacher_values shape \(3, 3\) must be student_hidden' leading shape \(4,\) followed by k"),
    (dict(teacher_values=torch.zeros(4, 11), teacher_indices=torch.zeros(4, 11, dtype=torch.int64)), ValueError,
     "k = 11 entries per row but the vocabulary has V = 10"),
    (dict(teacher_indices=_XS["teacher_indices"].float()), TypeError, "teacher_indices must be an int64 or int32 tensor"),
    (dict(student_softcap=0.0), ValueError, "student_softcap must be a finite number > 0"),
    (dict(tail="uniform"), ValueError, "tail='uniform' needs values='logprobs'"),
    (dict(labels=torch.tensor([0, 1, 2, 10])), ValueError, r"labels holds 10, outside \[0, 10\)"),
    (dict(hard_weight=0.5), ValueError, "hard_weight=0.5 > 0 needs labels"),
    (dict(chunk_size=0), ValueError, "chunk_size must be >= 1"),
    (dict(teacher_values=_XS["teacher_values"].to("meta")), ValueError, "teacher_values is on meta but student_hidden is on cpu"),
]


def linear_sparse_module():
    x = linear_sparse_inputs((5,), 6, 40, 4, values="logprobs", bias=False)
    y = make_labels((5,), 40, ignored=(2,))
    opts = dict(values="logprobs", tail="uniform", hard_weight=0.2, student_softcap=2.0, chunk_size=2, backend="cpu")
    module = fastkd.nn.FusedLinearSparseKDLoss(temperature=3.0, **opts)
    head = torch.nn.Linear(6, 40, bias=False)
    with torch.no_grad():
        head.weight.copy_(x["student_weight"])
    inputs = (x["student_hidden"], head, x["teacher_values"], x["teacher_indices"], y)
    call = Sample("", tuple(x[k] for k in LINEAR_SPARSE_ARGS) + (3.0,), dict(opts, labels=y))
    return module, inputs, call, ["tail='uniform'", "student_softcap=2.0", "chunk_size=2"]


LINEAR_SPARSE = OpSpec("fused_linear_sparse_kd_loss", ("sparse_kd_forward",), sparse_ops.TRITON_ERROR, linear_sparse_samples,
                       linear_sparse_kernel_calls, lambda: dict(_XS, temperature=2.0), LINEAR_SPARSE_BAD, linear_sparse_module,
                       entry="fused_linear_sparse_kd_forward", triton_twin=False)


# ------------------------------------------------------------------------------------------
# hint_loss, attention_transfer_loss
# ------------------------------------------------------------------------------------------


def hint_samples(device, dtype):
    s, t = make_features((3, 2, 5), dtype, device=device)
    return [Sample(kind, (s, t), dict(kind=kind, reduction="none" if kind == "cosine" else "mean")) for kind in feature_ops.HINT_KINDS]


def hint_kernel_calls(device, dtype):
    s, t = make_features((5, 33), dtype, device=device)
    return [("hint_forward", (s.clone().requires_grad_(compute_grad), t, kind, reduction, compute_grad))
            for kind in feature_ops.HINT_KINDS for reduction, compute_grad in (("mean", True), ("none", True), ("sum", False))]


_FS, _FT = make_features((4, 10))
HINT_BAD = [
    (dict(student_feat=[[1.0]]), TypeError, "student_feat must be a torch.Tensor"),
    (dict(student_feat=torch.ones(4, 10, dtype=torch.int64)), TypeError, "student_feat must be a floating-point tensor"),
    (dict(teacher_feat=torch.ones(4, 10, dtype=torch.int32)), TypeError, "teacher_feat must be a floating-point tensor"),
    (dict(student_feat=torch.ones(10), teacher_feat=torch.ones(10)), ValueError,
     r"student_feat must have at least 2 dimensions \(\[B, \.\.\.\]\), got shape \(10,\)"),
    (dict(teacher_feat=torch.ones(4, 11)), ValueError, r"teacher_feat shape \(4, 11\) must equal student_feat shape \(4, 10\)"),
    (dict(teacher_feat=torch.ones(5, 10)), ValueError, r"teacher_feat shape \(5, 10\) must equal"),
    (dict(student_feat=torch.ones(0, 10), teacher_feat=torch.ones(0, 10)), ValueError, r"student_feat is empty \(shape \(0, 10\)\)"),
    (dict(student_feat=torch.ones(4, 0), teacher_feat=torch.ones(4, 0)), ValueError, "student_feat is empty"),
    (dict(kind="kl"), ValueError, "kind must be one of 'mse', 'l1', 'smooth_l1', 'cosine', 'normalized_mse', got 'kl'"),
    (dict(reduction="batchmean"), ValueError, "reduction must be one of 'mean', 'sum', 'none', got 'batchmean'"),
    (dict(teacher_feat=_FT.to("meta")), ValueError, "teacher_feat is on meta but student_feat is on cpu"),
    (dict(backend="fast"), ValueError, "backend='fast' is not a backend"),
]


def hint_module():
    s, t = make_features((4, 30))
    module = fastkd.nn.HintLoss(kind="cosine", reduction="sum", backend="cpu")
    return module, (s, t), Sample("", (s, t), dict(kind="cosine", reduction="sum", backend="cpu")), ["kind='cosine'", "reduction='sum'"]


HINT = OpSpec("hint_loss", ("hint_forward",), feature_ops.HINT_TRITON_ERROR, hint_samples, hint_kernel_calls,
              lambda: dict(student_feat=_FS, teacher_feat=_FT), HINT_BAD, hint_module)


def attention_samples(device, dtype):
    ms, mt = make_maps((2, 3, 3, 4), 4, dtype, device=device)
    ms2, mt2 = make_maps((2, 2, 4, 4), 5, dtype, seed=1, device=device)
    out = [Sample(f"p={p}", (ms, mt), dict(p=p, reduction="none" if p == 1.0 else "mean")) for p in (2.0, 1.0, 2.5)]
    return out + [Sample("two pairs", ([ms, ms2], [mt, mt2]), {}, grad=((0, 0), (0, 1)), teacher=((1, 0), (1, 1)))]


def attention_kernel_calls(device, dtype):
    ms, mt = make_maps((3, 4, 5, 6), 2, dtype, device=device)
    return [("attention_transfer_forward", (ms.flatten(2).clone().requires_grad_(compute_grad), mt.flatten(2), p, reduction, compute_grad))
            for p, reduction, compute_grad in ((2.0, "mean", True), (1.0, "none", True), (2.5, "sum", False))]


_MS, _MT = make_maps((2, 3, 4, 4), 5)
ATTENTION_BAD = [
    (dict(student_feats=_MS.numpy()), TypeError, "student_feats and teacher_feats must both be tensors or both be lists"),
    (dict(student_feats=[_MS], teacher_feats=_MT), TypeError, "must both be tensors or both be lists of tensors, got list and Tensor"),
    (dict(student_feats={"a": _MS}, teacher_feats={"a": _MT}), TypeError, "student_feats must be a tensor or a list/tuple of tensors, got dict"),
    (dict(student_feats=[_MS, _MS], teacher_feats=[_MT]), ValueError, "must hold as many feature maps, got 2 and 1"),
    (dict(student_feats=[], teacher_feats=[]), ValueError, "student_feats is empty"),
    (dict(student_feats=[_MS, _MS.flatten(1)], teacher_feats=[_MT, _MT]), ValueError,
     r"student_feats\[1\] must have at least 3 dimensions \(\[B, C, H, W\]\), got shape \(2, 48\)"),
    (dict(teacher_feats=_MT[:1]), ValueError, "teacher_feats has batch size 1 but student_feats has 2"),
    (dict(teacher_feats=_MT[..., :3]), ValueError, r"teacher_feats has spatial shape \(4, 3\) but student_feats has \(4, 4\)"),
    (dict(teacher_feats=_MT.int()), TypeError, "teacher_feats must be a floating-point tensor"),
    (dict(student_feats=_MS[:, :0], teacher_feats=_MT), ValueError, r"student_feats is empty \(shape \(2, 0, 4, 4\)\)"),
    (dict(teacher_feats=_MT.to("meta")), ValueError, "teacher_feats is on meta but student_feats is on cpu"),
    (dict(p=0.5), ValueError, r"p must be in \[1, inf\], got 0.5"),
    (dict(p=math.nan), ValueError, "p must be a number, got nan"),
    (dict(p=None), TypeError, "p must be a real number, got NoneType"),
    (dict(reduction="batchmean"), ValueError, "reduction must be one of 'mean', 'sum', 'none'"),
]


def attention_module():
    ms, mt = make_maps((2, 3, 4, 4), 5)
    module = fastkd.nn.AttentionTransferLoss(p=1.5, reduction="none", backend="cpu")
    return module, (ms, mt), Sample("", (ms, mt), dict(p=1.5, reduction="none", backend="cpu")), ["p=1.5", "reduction='none'"]


ATTENTION = OpSpec("attention_transfer_loss", ("attention_transfer_forward",), feature_ops.AT_TRITON_ERROR, attention_samples,
                   attention_kernel_calls, lambda: dict(student_feats=_MS, teacher_feats=_MT), ATTENTION_BAD, attention_module)


# ------------------------------------------------------------------------------------------
# rkd_distance_loss, rkd_angle_loss, sp_loss, pkt_loss
# ------------------------------------------------------------------------------------------

_ES, _ET = make_embeddings(4, 6, 5)
RELATIONAL_BAD = [
    (dict(student=[[1.0]]), TypeError, "student must be a torch.Tensor"),
    (dict(student=torch.ones(4, 6, dtype=torch.int64)), TypeError, "student must be a floating-point tensor"),
    (dict(teacher=torch.ones(4, 5, dtype=torch.int32)), TypeError, "teacher must be a floating-point tensor"),
    (dict(teacher=torch.ones(5, 5)), ValueError, r"teacher has batch size 5 but student has 4"),
    (dict(student=torch.ones(4)), ValueError, r"student must have at least 2 dimensions \[B, D\]"),
    (dict(teacher=torch.ones(4)), ValueError, r"teacher must have at least 2 dimensions \[B, D\]"),
    (dict(student=torch.tensor(1.0)), ValueError, "student must have at least one dimension"),
    (dict(student=torch.ones(0, 6), teacher=torch.ones(0, 5)), ValueError, "empty batch: student"),
    (dict(student=torch.ones(4, 0)), ValueError, r"student of shape \(4, 0\) has no features"),
    (dict(teacher=torch.ones(4, 3, 0)), ValueError, r"teacher of shape \(4, 3, 0\) has no features"),
    (dict(teacher=_ET.to("meta")), ValueError, "teacher is on meta but student is on cpu"),
    (dict(backend="fast"), ValueError, "backend='fast' is not a backend"),
    (dict(backend="cuda"), RuntimeError, r"backend 'cuda' cannot run this call: .*CUDA tensors, got a cpu tensor"),
]


def _relational(short, module_cls, **options):
    triton_error = table.OPS[f"{short}_loss"].kernel.triton_error
    kernel = f"{short}_forward"
    extra = tuple(options.values())  # pkt's eps sits between the tensors and compute_grad

    def samples(device, dtype):
        s, t = make_embeddings(6, (2, 5), 7, dtype, seed=12, device=device)
        s2, t2 = make_embeddings(5, 6, 4, dtype, device=device)
        return [Sample("[6, 2, 5]", (s, t), dict(options)), Sample("[5, 6]", (s2, t2), dict(options))]

    def kernel_calls(device, dtype):
        s, t = make_embeddings(5, 7, 4, dtype, device=device)
        return [(kernel, (s.clone().requires_grad_(compute_grad), t, *extra, compute_grad)) for compute_grad in (True, False)]

    def module():
        s, t = make_embeddings(5, 6, 4)
        return module_cls(**options, backend="cpu"), (s, t), Sample("", (s, t), dict(options, backend="cpu")), ["backend='cpu'"]

    return OpSpec(f"{short}_loss", (kernel,), triton_error, samples, kernel_calls, lambda: dict(student=_ES, teacher=_ET), RELATIONAL_BAD, module,
                  contract_samples=1)


RELATIONAL = [
    _relational("rkd_distance", fastkd.nn.RKDDistanceLoss),
    _relational("rkd_angle", fastkd.nn.RKDAngleLoss),
    _relational("sp", fastkd.nn.SPLoss),
    _relational("pkt", fastkd.nn.PKTLoss, eps=1e-7),
]

SPECS = [KD, DKD, SPARSE, LINEAR, LINEAR_SPARSE, HINT, ATTENTION, *RELATIONAL]
