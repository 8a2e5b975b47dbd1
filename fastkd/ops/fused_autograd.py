"""What every fused loss op shares: its fake kernel, its autograd, its Triton registration.

A fused loss op computes its loss and the gradient w.r.t. its first input in one pass. Its
schema (``csrc/ops.cpp``) follows one convention, which is what lets this module serve every
family::

    fastkd::<name>(Tensor student, ..., str reduction, ..., bool compute_grad, Tensor? grad_scale=None)
        -> (Tensor loss, Tensor grad)
    fastkd::<name>_rescale_(Tensor(a!) grad, Tensor student, ..., str reduction, ..., Tensor grad_scale) -> ()

``loss`` is float32 (float64 for a float64 student), ``[N]`` for ``reduction="none"`` else a
scalar; ``grad`` is shaped like the student (``[N, V]`` for logits; any ``[N, ...]``, e.g.
``[B, C, HW]`` feature maps) in the student's dtype (already carrying the reduction's scale), or
an empty ``[0]`` tensor when ``compute_grad`` is false. Only the student receives a gradient.
``grad_scale`` (a float tensor of 1 or N elements on the student's device) multiplies the
gradient inside the kernel, before its one rounding to the student's dtype. ``<name>_rescale_``
recomputes the gradient the op returned into that same buffer with ``grad_scale`` folded in,
except that a row whose scale is exactly 1 is left alone: each GPU program reads its scale on
the device and returns at once (the CPU reads it on the host). An op whose loss is always a
scalar (the relational losses: one number per batch) has no ``reduction`` argument
(``reduction_arg=None``) and, for now, neither ``grad_scale`` nor a rescale op
(``grad_scale=False``): ``fastkd/ops/relational.py`` hands it a float32 copy of a 16-bit
student instead ([B, D] embeddings: small).

Rounding a 16-bit gradient once. Multiplying a gradient already stored in bfloat16/float16 by
``grad_output`` rounds it a second time whenever ``grad_output`` is not a power of two (measured:
a quarter of bf16 entries one unit in the last place off, the error 1.5-2x that of one
rounding). So for a 16-bit student the backward never scales the stored value: it folds
``grad_output`` into the kernel's gradient coefficient (float32) and has the kernel write the
gradient again from the saved inputs. What each case costs, against the single multiply it
replaces (read and write of the gradient):

* ``grad_output`` exactly 1 (the common ``loss.backward()``; ``loss.sum().backward()`` for
  ``reduction="none"``): nothing, as before. On CPU the host reads the scalar; on a GPU the
  rescale kernel's programs read it on the device and return (one launch, no traffic, no
  synchronisation), as ``kernels/scale.py`` does for float32 students.
* any other ``grad_output`` (loss weights, gradient accumulation's 1/k, a per-row weight for
  ``reduction="none"``): one more read of the op's inputs (student and teacher, ~2x the gradient's
  bytes) and the write of the gradient, instead of a read and write of the gradient: ~1.5x the
  traffic of the multiply, and no extra memory (the forward's buffer is rewritten in place).
  Measured on the CPU backend (kd, bf16, N = 1024, V = 32000, 2 busy cores): 60 ms, against 64 ms
  for the in-place bf16 multiply it replaces (0.6 ms at grad_output 1). Not yet timed on a GPU.
* float32 and float64 students: the plain in-place multiply (correctly rounded there).

A float32 copy of the gradient held from forward to backward would also round once, but costs
2 bytes per entry more for the whole step ([N, V] at LLM vocabularies is the memory this library
exists to save), so it is not used.

The backward, four cases:

* ordinary ``backward()``: as above; the saved buffer is handed out once and may be rewritten or
  scaled in place, so no second ``[N, V]`` tensor is allocated.
* a second backward through a retained graph (``retain_graph=True``): the buffer was handed out,
  so the op runs again on the saved inputs (with ``grad_scale`` for a 16-bit student).
  Repeated backward is correct, never refused.
* ``create_graph=True`` (gradient penalties, meta-learning: grad mode is on inside backward):
  the first-order gradient is computed from the op's differentiable reference, so that second
  derivatives are right. The fused buffer cannot serve here: it is a constant to autograd.
* traced (torch.compile, AOT autograd, fake tensors): nothing may be mutated and grad_output is
  not known, so a 16-bit student's gradient comes from the op run again with ``grad_scale``,
  and the public wrappers ask the traced forward for the loss alone (``compute_grad(...)``
  below): the step reads the inputs twice and writes the gradient once, the traffic the traced
  step had before (gradient written, then read and written by the multiply). A float32
  student's saved gradient is multiplied out of place, as before.
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


LOW_PRECISION = (torch.bfloat16, torch.float16)


def compute_grad(student: torch.Tensor, rescales: bool = True) -> bool:
    """The ``compute_grad`` an op is called with: whether the student needs a gradient, except
    under torch.compile for a 16-bit student of an op that rescales (``grad_scale``): its traced
    backward computes the gradient afresh with ``grad_output`` folded in (so the forward would
    compute one for nothing)."""
    wanted = torch.is_grad_enabled() and student.requires_grad
    return wanted and not (rescales and student.dtype in LOW_PRECISION and torch.compiler.is_compiling())


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

    ``reference(*op_args)`` is the op's differentiable composite, taking the op's arguments up
    to ``compute_grad`` (flattened ``[N, V]`` tensors and all) and returning what the op's first
    output is; it serves double backward. ``reduction_arg`` is the index of the ``reduction``
    argument, or None for an op without one (its loss is always a scalar). ``grad_scale``: the op
    ends with ``grad_scale`` and has ``fastkd::<name>_rescale_`` (the module docstring).
    """

    def __init__(self, name: str, reference: Callable, reduction_arg: Optional[int], grad_scale: bool = True):
        self.name = name
        self.reference = reference
        self.reduction_arg = reduction_arg
        self.grad_scale = grad_scale
        # Set from the schema at registration: the index of compute_grad among the op's arguments
        # (grad_scale, when the op has it, follows), and their number. A caller may leave out
        # grad_scale (it defaults to None), so positions are counted from the front.
        self.compute_grad_index = None
        self.n_args = None

    def _learn_schema(self, op) -> None:
        names = [a.name for a in op._schema.arguments]
        self.compute_grad_index = names.index("compute_grad")
        self.n_args = len(names)
        if self.grad_scale != (names[-1] == "grad_scale"):
            raise TypeError(f"fastkd::{self.name}: grad_scale={self.grad_scale} but the schema ends with {names[-1]}")

    # -- fake kernel: the shapes follow from the convention alone -------------------------------

    def _per_row(self, op_args) -> bool:
        return self.reduction_arg is not None and op_args[self.reduction_arg] == "none"

    def fake(self, student, *args):
        compute_grad = args[self.compute_grad_index - 1]
        per_row = self._per_row((student,) + args)
        loss = student.new_empty((student.shape[0],) if per_row else (), dtype=loss_dtype(student))
        grad = torch.empty_like(student) if compute_grad else student.new_empty((0,))
        return loss, grad

    # -- autograd -------------------------------------------------------------------------------

    def fake_rescale(self, grad, *args):
        return None

    def _setup_context(self, op, rescale):
        def setup_context(ctx, inputs, output):
            grad = output[1]
            ctx.per_row = self._per_row(inputs)
            ctx.student_dim = inputs[0].dim()  # a per-row scale broadcasts over the other dims
            ctx.op = op
            # A 16-bit gradient is rescaled by recomputing it (the module docstring).
            ctx.rescale = rescale if self.grad_scale and inputs[0].dtype in LOW_PRECISION else None
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
        # Arguments left out (grad_scale's default) are None.
        args = list(ctx.plain_args) + [None] * (self.n_args - ctx.n_inputs)
        saved = ctx.saved_tensors
        for slot, tensor in zip(ctx.tensor_slots, saved):
            args[slot] = tensor
        return args, saved

    def _rerun(self, ctx, args, grad_scale):
        """The op run again on the saved inputs for its gradient, times ``grad_scale`` (None: 1)."""
        args[self.compute_grad_index] = True
        if self.grad_scale:
            args[self.compute_grad_index + 1] = grad_scale
        with torch.no_grad():
            return ctx.op(*args)[1]

    def _backward(self, ctx, grad_loss, _grad_of_grad):
        nothing = (None,) * ctx.n_inputs
        if grad_loss is None:  # nothing flowed back into the loss
            return nothing
        scale = grad_loss.reshape(grad_loss.shape + (1,) * (ctx.student_dim - 1)) if ctx.per_row else grad_loss
        if not ctx.eager:
            args, saved = self._inputs(ctx)
            if ctx.rescale is not None:
                # Nothing may be mutated here: the gradient afresh, grad_output folded in.
                return (self._rerun(ctx, args, _grad_scale(grad_loss, ctx.per_row)),) + nothing[1:]
            return (saved[-1] * scale,) + nothing[1:]
        if torch.is_grad_enabled():
            # create_graph=True: a gradient that autograd can differentiate again.
            args, _ = self._inputs(ctx)
            student = args[0]
            with torch.enable_grad():
                loss = self.reference(*args[:self.compute_grad_index + 1])
            (grad,) = torch.autograd.grad(loss, student, grad_loss, create_graph=True)
            return (grad,) + nothing[1:]
        grad, ctx.fused_grad = ctx.fused_grad, None
        if ctx.rescale is not None:
            return (self._rescaled(ctx, grad, grad_loss),) + nothing[1:]
        if grad is None:
            # A second backward through a retained graph: the first one handed the buffer out.
            args, _ = self._inputs(ctx)
            grad = self._rerun(ctx, args, None)
        if not ctx.per_row and grad_loss.device.type == "cpu" and grad_loss.item() == 1.0:
            # The common `loss.backward()`: nothing to scale. Reading a CPU scalar is no device
            # synchronisation, and it saves a read and write of the whole [N, V] gradient.
            return (grad,) + nothing[1:]
        if not ctx.per_row and grad.is_cuda and grad.is_contiguous() and _scale_kernels() is not None:
            # The same skip on the GPU, decided on the device (kernels/scale.py).
            return (_scale_kernels().scale_unless_one_(grad, grad_loss),) + nothing[1:]
        return (grad.mul_(scale),) + nothing[1:]

    def _rescaled(self, ctx, grad, grad_loss):
        """A 16-bit student's gradient times grad_output, rounded once (the module docstring)."""
        args, _ = self._inputs(ctx)
        go = _grad_scale(grad_loss, ctx.per_row)
        if grad is None:
            # A second backward through a retained graph: the first one handed the buffer out.
            return self._rerun(ctx, args, go)
        if not ctx.per_row and go.device.type == "cpu" and go.item() == 1.0:
            return grad  # the common `loss.backward()`: read on the host, no synchronisation
        ctx.rescale(grad, *args[:self.compute_grad_index], go)
        return grad

    # -- registration ---------------------------------------------------------------------------

    def register(self, triton_launcher: Optional[Callable] = None, triton_error: Optional[str] = None,
                 triton_rescale: Optional[Callable] = None) -> Optional[str]:
        """Registers fake and autograd for ``fastkd::<name>`` (when the extension loaded) and for
        its Triton twin ``fastkd::<name>_triton`` (when ``triton_launcher`` is given); returns why
        the Triton backend is unavailable, or None. ``triton_rescale``: the Triton twin's
        ``<name>_rescale_`` (same arguments), a plain function: it only runs in eager backward."""
        if _ext.LOAD_ERROR is None:
            op = getattr(torch.ops.fastkd, self.name).default
            self._learn_schema(op)
            rescale = None
            torch.library.register_fake(f"fastkd::{self.name}")(self.fake)
            if self.grad_scale:
                rescale = getattr(torch.ops.fastkd, f"{self.name}_rescale_").default
                torch.library.register_fake(f"fastkd::{self.name}_rescale_")(self.fake_rescale)
            torch.library.register_autograd(f"fastkd::{self.name}", self._backward, setup_context=self._setup_context(op, rescale))
        if triton_launcher is None:
            return triton_error or "no Triton kernel for this op"
        tri = torch.library.triton_op(f"fastkd::{self.name}_triton", mutates_args=())(triton_launcher)
        # triton_op would trace the launcher itself on fake tensors, which fails under the
        # interpreter (it then runs the kernel on them); the shapes are known without it.
        tri.register_fake(self.fake)
        tri_op = getattr(torch.ops.fastkd, f"{self.name}_triton").default
        self._learn_schema(tri_op)
        if self.grad_scale and triton_rescale is None:
            raise TypeError(f"fastkd::{self.name}_triton needs its rescale function (triton_rescale)")
        tri.register_autograd(self._backward, setup_context=self._setup_context(tri_op, triton_rescale))
        return None


def _grad_scale(grad_loss: torch.Tensor, per_row: bool) -> torch.Tensor:
    """grad_output as an op's ``grad_scale``: a contiguous 0-dim or ``[N]`` tensor (a per-row
    grad_output may arrive expanded from a scalar, stride 0)."""
    return grad_loss.reshape(-1).contiguous() if per_row else grad_loss.reshape(())


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
