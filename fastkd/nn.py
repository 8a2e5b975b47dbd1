"""Drop-in ``torch.nn`` modules around the functional API."""

from __future__ import annotations

from typing import Optional

import torch

from fastkd.backends import requested_backend
from fastkd.functional import fused_linear_kd_loss, kd_loss
from fastkd.ops import kd as _kd


class KDLoss(torch.nn.Module):
    """Module form of :func:`fastkd.kd_loss`; the constructor takes its keyword options.

    ``forward(student_logits, teacher_logits, labels=None)`` returns the loss. Bad options
    (a negative temperature, say) fail here, at construction, not at the first forward.

    Example::

        criterion = fastkd.nn.KDLoss(temperature=4.0, hard_weight=0.1)
        loss = criterion(student(x), teacher_logits, labels)
    """

    def __init__(
        self,
        temperature: float = 1.0,
        *,
        hard_weight: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "batchmean",
        t2_scale: bool = True,
        backend: Optional[str] = None,
    ):
        super().__init__()
        temperature, hard_weight, ignore_index = _kd.validate_options(temperature, hard_weight, ignore_index, reduction, t2_scale)
        if backend is not None:
            requested_backend(backend)  # an unknown name fails now, not at the first forward
        self.temperature = temperature
        self.hard_weight = hard_weight
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.t2_scale = t2_scale
        self.backend = backend

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return kd_loss(
            student_logits,
            teacher_logits,
            self.temperature,
            labels=labels,
            hard_weight=self.hard_weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            t2_scale=self.t2_scale,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, hard_weight={self.hard_weight}, ignore_index={self.ignore_index}, "
            f"reduction={self.reduction!r}, t2_scale={self.t2_scale}, backend={self.backend!r}"
        )


class FusedLinearKDLoss(torch.nn.Module):
    """Module form of :func:`fastkd.fused_linear_kd_loss`; the constructor takes its keyword
    options, checked at construction.

    ``forward(student_hidden, student_head, teacher_hidden, teacher_head, labels=None)`` takes
    the two output layers as ``nn.Linear`` modules (or ``(weight, bias)`` pairs) and returns the
    loss; the logits are never materialised.

    Example::

        criterion = fastkd.nn.FusedLinearKDLoss(temperature=2.0)
        loss = criterion(student_h, student.lm_head, teacher_h, teacher.lm_head, labels)
    """

    def __init__(
        self,
        temperature: float = 1.0,
        *,
        hard_weight: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "batchmean",
        t2_scale: bool = True,
        chunk_size: Optional[int] = None,
        backend: Optional[str] = None,
    ):
        super().__init__()
        temperature, hard_weight, ignore_index = _kd.validate_options(temperature, hard_weight, ignore_index, reduction, t2_scale)
        if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
            raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")
        if backend is not None:
            requested_backend(backend)
        self.temperature = temperature
        self.hard_weight = hard_weight
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.t2_scale = t2_scale
        self.chunk_size = chunk_size
        self.backend = backend

    @staticmethod
    def _head(head):
        if isinstance(head, torch.nn.Linear):
            return head.weight, head.bias
        weight, bias = head
        return weight, bias

    def forward(self, student_hidden, student_head, teacher_hidden, teacher_head, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        w_s, b_s = self._head(student_head)
        w_t, b_t = self._head(teacher_head)
        return fused_linear_kd_loss(
            student_hidden, w_s, teacher_hidden, w_t, self.temperature,
            student_bias=b_s, teacher_bias=b_t, labels=labels, hard_weight=self.hard_weight,
            ignore_index=self.ignore_index, reduction=self.reduction, t2_scale=self.t2_scale,
            chunk_size=self.chunk_size, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, hard_weight={self.hard_weight}, ignore_index={self.ignore_index}, "
            f"reduction={self.reduction!r}, t2_scale={self.t2_scale}, chunk_size={self.chunk_size}, backend={self.backend!r}"
        )
