"""Drop-in ``torch.nn`` modules around the functional API."""

from __future__ import annotations

from typing import Optional

import torch

from fastkd.backends import requested_backend
from fastkd.functional import dkd_loss, kd_loss
from fastkd.ops import dkd as _dkd
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


class DKDLoss(torch.nn.Module):
    """Module form of :func:`fastkd.dkd_loss` (decoupled KD); the constructor takes its options.

    ``forward(student_logits, teacher_logits, labels)`` returns the loss. Bad options fail here,
    at construction, not at the first forward. mdistiller's DKD warm-up (the loss weight
    ``min(epoch / warmup, 1)``) belongs to the training loop; the engine's ``kind = "dkd"``
    term applies it.

    Example::

        criterion = fastkd.nn.DKDLoss(temperature=4.0, alpha=1.0, beta=8.0)
        loss = criterion(student(x), teacher_logits, labels)
    """

    def __init__(
        self,
        temperature: float = 4.0,
        *,
        alpha: float = 1.0,
        beta: float = 8.0,
        ignore_index: int = -100,
        reduction: str = "batchmean",
        backend: Optional[str] = None,
    ):
        super().__init__()
        temperature, alpha, beta, ignore_index = _dkd.validate_options(temperature, alpha, beta, ignore_index, reduction)
        if backend is not None:
            requested_backend(backend)  # an unknown name fails now, not at the first forward
        self.temperature = temperature
        self.alpha = alpha
        self.beta = beta
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.backend = backend

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return dkd_loss(
            student_logits,
            teacher_logits,
            labels,
            self.temperature,
            alpha=self.alpha,
            beta=self.beta,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, alpha={self.alpha}, beta={self.beta}, ignore_index={self.ignore_index}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}"
        )
