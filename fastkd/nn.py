"""Drop-in ``torch.nn`` modules around the functional API."""

from __future__ import annotations

from typing import Optional

import torch

from fastkd.backends import requested_backend
from fastkd.functional import attention_transfer_loss, hint_loss, kd_loss
from fastkd.ops import feature as _feature
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


class HintLoss(torch.nn.Module):
    """Module form of :func:`fastkd.hint_loss` (FitNets); options checked at construction.

    ``forward(student_feat, teacher_feat)`` returns the loss. The regressor that maps the
    student's feature to the teacher's shape is a separate module (apply it first).

    Example::

        regressor = torch.nn.Conv2d(64, 256, kernel_size=1)
        criterion = fastkd.nn.HintLoss(kind="mse")
        loss = criterion(regressor(student_feat), teacher_feat)
    """

    def __init__(self, kind: str = "mse", *, reduction: str = "mean", backend: Optional[str] = None):
        super().__init__()
        _feature.validate_hint_options(kind, reduction)
        if backend is not None:
            requested_backend(backend)
        self.kind, self.reduction, self.backend = kind, reduction, backend

    def forward(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
        return hint_loss(student_feat, teacher_feat, kind=self.kind, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, reduction={self.reduction!r}, backend={self.backend!r}"


class AttentionTransferLoss(torch.nn.Module):
    """Module form of :func:`fastkd.attention_transfer_loss`; options checked at construction.

    ``forward(student_feats, teacher_feats)`` takes one ``[B, C, H, W]`` pair or lists of them
    (summed).

    Example::

        criterion = fastkd.nn.AttentionTransferLoss(p=2)
        loss = 1000 / 2 * criterion([s_g1, s_g2, s_g3], [t_g1, t_g2, t_g3])   # beta/2, as the paper
    """

    def __init__(self, p: float = 2.0, *, reduction: str = "mean", backend: Optional[str] = None):
        super().__init__()
        p = _feature.validate_attention_options(p, reduction)
        if backend is not None:
            requested_backend(backend)
        self.p, self.reduction, self.backend = p, reduction, backend

    def forward(self, student_feats, teacher_feats) -> torch.Tensor:
        return attention_transfer_loss(student_feats, teacher_feats, p=self.p, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"p={self.p:g}, reduction={self.reduction!r}, backend={self.backend!r}"
