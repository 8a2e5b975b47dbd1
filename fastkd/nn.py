"""Drop-in ``torch.nn`` modules around the functional API."""

from __future__ import annotations

from typing import Optional

import torch

from fastkd.backends import requested_backend
from fastkd.functional import kd_loss, sparse_kd_loss
from fastkd.ops import kd as _kd
from fastkd.ops import sparse_kd as _sparse_kd


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


class SparseKDLoss(torch.nn.Module):
    """Module form of :func:`fastkd.sparse_kd_loss` (a teacher given as top-k values and indices);
    the constructor takes its keyword options and checks them.

    ``forward(student_logits, teacher_values, teacher_indices, labels=None)`` returns the loss.

    Example::

        criterion = fastkd.nn.SparseKDLoss(temperature=2.0, values="logprobs", tail="uniform")
        loss = criterion(student(x), topk_logprobs, topk_indices)
    """

    def __init__(
        self,
        temperature: float = 1.0,
        *,
        values: str = "logits",
        tail: str = "renormalize",
        hard_weight: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "batchmean",
        t2_scale: bool = True,
        backend: Optional[str] = None,
    ):
        super().__init__()
        temperature, hard_weight, ignore_index = _sparse_kd.validate_options(
            temperature, values, tail, hard_weight, ignore_index, reduction, t2_scale
        )
        if backend is not None:
            requested_backend(backend)  # an unknown name fails now, not at the first forward
        self.temperature = temperature
        self.values = values
        self.tail = tail
        self.hard_weight = hard_weight
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.t2_scale = t2_scale
        self.backend = backend

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_values: torch.Tensor,
        teacher_indices: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return sparse_kd_loss(
            student_logits,
            teacher_values,
            teacher_indices,
            self.temperature,
            values=self.values,
            tail=self.tail,
            labels=labels,
            hard_weight=self.hard_weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            t2_scale=self.t2_scale,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, values={self.values!r}, tail={self.tail!r}, "
            f"hard_weight={self.hard_weight}, ignore_index={self.ignore_index}, "
            f"reduction={self.reduction!r}, t2_scale={self.t2_scale}, backend={self.backend!r}"
        )
