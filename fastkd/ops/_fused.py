"""What every fused loss op shares: its fake kernel, its autograd, its Triton registration.

A fused loss op computes its loss and the gradient w.r.t. its first input in one pass. Its
schema (``csrc/ops.cpp``) follows one convention, which is what lets this module serve every
family::

    fastkd::<name>(Tensor student, ..., str reduction, ..., bool compute_grad) -> (Tensor loss, Tensor grad)

``loss`` is float32 (float64 for a float64 student), ``[N]`` for ``reduction="none"`` else a
scalar; ``grad`` is shaped like the student (``[N, V]`` for logits; any ``[N, ...]``, e.g.
``[B, C, HW]`` feature maps) in the student's dtype (already carrying the reduction's scale), or
an empty ``[0]`` tensor when ``compute_grad`` is false. Only the student receives a gradient.
An op whose loss is always a scalar (the relational losses: one number per batch) has no
``reduction`` argument: it is registered with ``reduction_arg=None``.

The backward, three cases:

* ordinary ``backward()``: multiply the saved gradient by ``grad_output`` and nothing else (no
  host synchronisation; a scalar ``grad_output`` of exactly 1 skips even the multiply: on CPU
  read directly, on a GPU by a kernel that reads it on the device, ``kernels/scale.py``). The
  saved buffer is handed out once and may be scaled in place, so no second ``[N, V]`` tensor is
  allocated.
* a second backward through a retained graph (``retain_graph=True``): the buffer was handed out,
  so the op runs again on the saved inputs. Repeated backward is correct, never refused.
* ``create_graph=True`` (gradient penalties, meta-learning: grad mode is on inside backward):
  the first-order gradient is computed from the op's differentiable reference, so that second
  derivatives are right. The fused buffer cannot serve here: it is a constant to autograd.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Optional, Sequence

import torch
from torch.utils import _python_dispatch

from fastkd import _ext

log = logging.getLogger("fastkd")


def loss_dtype(student: torch.Tensor) -> torch.dtype:
    return torch.float64 if student.dtype == torch.float64 else torch.float32


def _plain_eager(*tensors) -> bool:
    """True outside any tracing (dynamo, AOT autograd, fake or functional tensors): only then may
    the backward read values, keep tensors on ctx, or mutate the saved gradient."""
    return (
        not torch.compiler.is_compiling()
        and _python_dispatch._get_current_dispatch_mode() is None
        and all(type(t) is torch.Tensor for t in tensors)
    )


class FusedLoss:
    """One fused loss op: registers its fake kernel and autograd, and its Triton twin.

    ``reference(*op_args)`` is the op's differentiable composite, taking exactly the op's
    arguments (flattened ``[N, V]`` tensors and all) and returning what the op's first output is;
    it serves double backward. ``reduction_arg`` is the index of the ``reduction`` argument, or
    None for an op without one (its loss is always a scalar).
    """

    def __init__(self, name: str, reference: Callable, reduction_arg: Optional[int]):
        self.name = name
        self.reference = reference
        self.reduction_arg = reduction_arg

    # -- fake kernel: the shapes follow from the convention alone -------------------------------

    def _per_row(self, op_args) -> bool:
        return self.reduction_arg is not None and op_args[self.reduction_arg] == "none"

    def fake(self, student, *args):
        compute_grad = args[-1]
        per_row = self._per_row((student,) + args)
        loss = student.new_empty((student.shape[0],) if per_row else (), dtype=loss_dtype(student))
        grad = torch.empty_like(student) if compute_grad else student.new_empty((0,))
        return loss, grad

    # -- autograd -------------------------------------------------------------------------------

    def _setup_context(self, op):
        def setup_context(ctx, inputs, output):
            grad = output[1]
            ctx.per_row = self._per_row(inputs)
            ctx.student_dim = inputs[0].dim()  # a per-row scale broadcasts over the other dims
            ctx.op = op
            ctx.n_inputs = len(inputs)
            # Tensors go through save_for_backward (autograd's version checks); everything else
            # is kept as is. None stands for an absent optional tensor.
            ctx.tensor_slots = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)]
            ctx.plain_args = [None if isinstance(x, torch.Tensor) else x for x in inputs]
            ctx.eager = _plain_eager(grad)
            if ctx.eager:
                ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_slots))
                # Not a saved tensor: the backward hands it out (and may scale it in place), which
                # autograd's version check would then hold against a later backward.
                ctx.fused_grad = grad
            else:
                ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_slots), grad)
            # The gradient output is never differentiated; without this, autograd would hand the
            # backward an [N, V] tensor of zeros for it on every call.
            ctx.mark_non_differentiable(grad)
            ctx.set_materialize_grads(False)

        return setup_context

    def _inputs(self, ctx):
        args = list(ctx.plain_args)
        saved = ctx.saved_tensors
        for slot, tensor in zip(ctx.tensor_slots, saved):
            args[slot] = tensor
        return args, saved

    def _backward(self, ctx, grad_loss, _grad_of_grad):
        nothing = (None,) * ctx.n_inputs
        if grad_loss is None:  # nothing flowed back into the loss
            return nothing
        scale = grad_loss.reshape(grad_loss.shape + (1,) * (ctx.student_dim - 1)) if ctx.per_row else grad_loss
        if not ctx.eager:
            args, saved = self._inputs(ctx)
            return (saved[-1] * scale,) + nothing[1:]
        if torch.is_grad_enabled():
            # create_graph=True: a gradient that autograd can differentiate again.
            args, _ = self._inputs(ctx)
            student = args[0]
            with torch.enable_grad():
                loss = self.reference(*args)
            (grad,) = torch.autograd.grad(loss, student, grad_loss, create_graph=True)
            return (grad,) + nothing[1:]
        grad, ctx.fused_grad = ctx.fused_grad, None
        if grad is None:
            # A second backward through a retained graph: the first one handed the buffer out.
            args, _ = self._inputs(ctx)
            args[-1] = True
            with torch.no_grad():
                _, grad = ctx.op(*args)
        if not ctx.per_row and grad_loss.device.type == "cpu" and grad_loss.item() == 1.0:
            # The common `loss.backward()`: nothing to scale. Reading a CPU scalar is no device
            # synchronisation, and it saves a read and write of the whole [N, V] gradient.
            return (grad,) + nothing[1:]
        if not ctx.per_row and grad.is_cuda and grad.is_contiguous() and _scale_kernels() is not None:
            # The same skip on the GPU, decided on the device (kernels/scale.py).
            return (_scale_kernels().scale_unless_one_(grad, grad_loss),) + nothing[1:]
        return (grad.mul_(scale),) + nothing[1:]

    # -- registration ---------------------------------------------------------------------------

    def register(self, triton_launcher: Optional[Callable] = None, triton_error: Optional[str] = None) -> Optional[str]:
        """Registers fake and autograd for ``fastkd::<name>`` (when the extension loaded) and for
        its Triton twin ``fastkd::<name>_triton`` (when ``triton_launcher`` is given); returns why
        the Triton backend is unavailable, or None."""
        if _ext.LOAD_ERROR is None:
            op = getattr(torch.ops.fastkd, self.name).default
            torch.library.register_fake(f"fastkd::{self.name}")(self.fake)
            torch.library.register_autograd(f"fastkd::{self.name}", self._backward, setup_context=self._setup_context(op))
        if triton_launcher is None:
            return triton_error or "no Triton kernel for this op"
        tri = torch.library.triton_op(f"fastkd::{self.name}_triton", mutates_args=())(triton_launcher)
        # triton_op would trace the launcher itself on fake tensors, which fails under the
        # interpreter (it then runs the kernel on them); the shapes are known without it.
        tri.register_fake(self.fake)
        tri_op = getattr(torch.ops.fastkd, f"{self.name}_triton").default
        tri.register_autograd(self._backward, setup_context=self._setup_context(tri_op))
        return None


@functools.cache
def _scale_kernels():
    """kernels/scale.py, or None without Triton (the backward then multiplies with torch)."""
    return import_triton("fastkd.kernels.scale")[0]


def import_triton(module: str):
    """``(module, None)`` or ``(None, reason)``: Triton may be missing or fail to initialise."""
    import importlib

    try:
        return importlib.import_module(module), None
    except Exception as exc:  # ImportError, or Triton failing to initialise
        return None, f"Triton is not available ({type(exc).__name__}: {exc})"


_said: set = set()


def note_constant_teacher(op: str, tensors: Sequence[torch.Tensor]) -> None:
    """Says once per op on the ``fastkd`` logger that a teacher requiring grad gets none."""
    if op not in _said and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        _said.add(op)
        log.warning(
            "fastkd.%s: the teacher is treated as a constant; its tensors require grad but receive "
            "no gradient (for mutual learning, call the loss once per peer with the other peer detached)",
            op,
        )
