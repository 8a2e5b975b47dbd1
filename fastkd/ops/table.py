"""The op table: every public loss declared once, with the kernels it runs and how a call is
dispatched to them.

A family module (``fastkd/ops/<family>.py``, in :data:`FAMILIES`) registers its fused kernels
with :func:`register_kernel` and declares each public loss as an :class:`Op`; the loss is the
module's function of the op's name, its reference ``<name>_reference`` beside it. Everything
that lists the losses derives the list from here: ``fastkd.functional`` (hence ``fastkd``'s
namespace), ``fastkd bench --ops`` and the engine's loss kinds.

Adding a loss to a family is its reference, its public function and one ``Op(...)`` line; a new
family is also its name in :data:`FAMILIES`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch

from fastkd import backends
from fastkd.ops import fused_autograd

# In the order fastkd lists its losses.
FAMILIES = ("kd", "dkd", "sparse_kd", "fused_linear", "fused_linear_sparse", "feature", "relational")


@dataclass(frozen=True, eq=False)
class Kernel:
    """A registered fused op: ``fastkd::<name>`` (C++: the cpu and cuda backends) and its Triton
    twin ``fastkd::<name>_triton``, with the schema convention of ``fused_autograd``."""

    name: str
    triton_error: Optional[str]  # why the Triton twin cannot run; None when it can
    checks: Mapping[str, backends.Check]  # each backend's check (fastkd/backends.py)
    rescales: bool  # the op takes grad_scale and has fastkd::<name>_rescale_

    def op(self, backend: str):
        """The registered op that ``backend`` (cpu, cuda or triton) runs."""
        return getattr(torch.ops.fastkd, f"{self.name}_triton" if backend == "triton" else self.name)


def register_kernel(family: str, name: str, op_reference: Callable, *, reduction_arg: Optional[int],
                    rescales: bool = True) -> Kernel:
    """Registers fake kernel and autograd of ``fastkd::<name>`` and its Triton twin (the launcher
    ``<name>`` of ``kernels/<family>.py``, with ``<name>_rescale_`` when the op ``rescales``).
    ``op_reference`` takes the op's arguments up to ``compute_grad`` (``fused_autograd.FusedLoss``)."""
    fused = fused_autograd.FusedLoss(name, op_reference, reduction_arg, grad_scale=rescales)
    module, error = fused_autograd.import_triton(f"fastkd.kernels.{family}")
    launcher = getattr(module, name) if module is not None else None
    rescale = getattr(module, f"{name}_rescale_") if module is not None and rescales else None
    error = fused.register(launcher, error, rescale)
    return Kernel(name, error, backends.fused_checks(name, error), rescales)


OPS: Dict[str, "Op"] = {}


@dataclass(frozen=True, eq=False)
class Op:
    """A public loss ``fastkd.<name>``, defined in ``fastkd/ops/<family>.py`` with its reference
    (``fastkd.<name>_reference``, the composite it is checked against and the backend
    ``"reference"``); its fused backends run ``kernel``. ``variants``: the modes that have code
    paths of their own (benchmarked one by one as ``<stem>_<variant>``)."""

    name: str
    family: str
    kernel: Kernel
    reference: Callable
    variants: Tuple[str, ...] = ()

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"{self.name}: family {self.family!r} is not one of {FAMILIES}")
        if self.reference.__name__ != f"{self.name}_reference":
            raise ValueError(f"{self.name}: its reference must be {self.name}_reference, got {self.reference.__name__}")
        OPS[self.name] = self

    @property
    def stem(self) -> str:
        """The name without ``_loss`` (``kd`` for ``kd_loss``): the bench's and the engine's."""
        return self.name.removesuffix("_loss")

    @property
    def function(self) -> Callable:
        """The public function (looked up when asked: the module declares the op before it)."""
        return getattr(importlib.import_module(f"fastkd.ops.{self.family}"), self.name)

    def choose(self, backend: Optional[str], student: torch.Tensor, *teacher) -> str:
        """The backend that runs this call (``backends.choose`` with the kernel's checks). The
        ``teacher`` tensors are constants: fastkd says so once if one requires grad."""
        fused_autograd.note_constant_teacher(self.name, teacher)
        return backends.choose(self.name, self.kernel.checks, student.device, backend, student, *teacher)

    def dispatch(self, backend: Optional[str], student: torch.Tensor, *teacher) -> Optional[Callable]:
        """None when the reference backend runs the call; else the registered op of the chosen
        backend as a function of the op's arguments before ``compute_grad``, which it adds (from
        its first argument, the student as the op takes it)."""
        name = self.choose(backend, student, *teacher)
        if name == "reference":
            return None
        op, rescales = self.kernel.op(name), self.kernel.rescales

        def run(*args):
            return op(*args, fused_autograd.compute_grad(args[0], rescales))

        return run


def all_ops(family: Optional[str] = None) -> List[Op]:
    """Every op (of ``family``), in the order of :data:`FAMILIES` and, within one, of declaration."""
    for f in FAMILIES:
        importlib.import_module(f"fastkd.ops.{f}")
    return sorted((op for op in OPS.values() if family in (None, op.family)), key=lambda op: FAMILIES.index(op.family))
