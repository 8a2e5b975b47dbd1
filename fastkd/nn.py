"""Drop-in ``torch.nn`` modules around the functional API."""

from __future__ import annotations

from typing import Optional

import torch

from fastkd.backends import requested_backend
from fastkd.functional import kd_loss
from fastkd.ops import kd as _kd


class KDLoss(torch.nn.Module):
    """Module form of :func:`fastkd.kd_loss`; the constructor takes its keyword options
    (``divergence``, ``beta`` and an ensemble's ``teacher_weights`` among them).

    ``forward(student_logits, teacher_logits, labels=None)`` returns the loss; ``teacher_logits``
    may be ``[M, *student_logits.shape]`` for an ensemble of M teachers. Bad options (a negative
    temperature, a ``beta`` the divergence does not take, say) fail here, at construction, not at
    the first forward.

    Example::

        criterion = fastkd.nn.KDLoss(temperature=4.0, hard_weight=0.1)
        loss = criterion(student(x), teacher_logits, labels)
        gkd = fastkd.nn.KDLoss(divergence="jsd", beta=0.5)
    """

    def __init__(
        self,
        temperature: float = 1.0,
        *,
        hard_weight: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "batchmean",
        t2_scale: bool = True,
        divergence: str = "kl",
        beta: Optional[float] = None,
        teacher_weights: Optional[torch.Tensor] = None,
        backend: Optional[str] = None,
    ):
        super().__init__()
        temperature, hard_weight, ignore_index, _ = _kd.validate_options(
            temperature, hard_weight, ignore_index, reduction, t2_scale, divergence, beta
        )
        if teacher_weights is not None:
            one_d = isinstance(teacher_weights, torch.Tensor) and teacher_weights.dim() == 1
            _kd.validate_teacher_weights(teacher_weights, teacher_weights.shape[0] if one_d else 0)
        if backend is not None:
            requested_backend(backend)  # an unknown name fails now, not at the first forward
        self.divergence = divergence
        self.beta = beta
        # A buffer, so that .to(device) moves it with the module (not saved in the state dict).
        self.register_buffer("teacher_weights", teacher_weights, persistent=False)
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
            divergence=self.divergence,
            beta=self.beta,
            teacher_weights=self.teacher_weights,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, hard_weight={self.hard_weight}, ignore_index={self.ignore_index}, "
            f"reduction={self.reduction!r}, t2_scale={self.t2_scale}, divergence={self.divergence!r}, "
            f"beta={self.beta!r}, backend={self.backend!r}"
        )
