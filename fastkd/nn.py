"""Drop-in ``torch.nn`` modules around the functional API."""

from __future__ import annotations

from typing import Optional

import torch

import dataclasses

from fastkd.backends import requested_backend
from fastkd.functional import (
    attention_transfer_loss,
    dkd_loss,
    fused_linear_kd_loss,
    fused_linear_sparse_kd_loss,
    hint_loss,
    kd_loss,
    pkt_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    sp_loss,
    sparse_kd_loss,
)
from fastkd.ops import dkd as _dkd
from fastkd.ops import feature as _feature
from fastkd.ops import fused_linear as _fused_linear
from fastkd.ops import kd as _kd
from fastkd.ops import relational as _relational
from fastkd.ops import sparse_kd as _sparse_kd
from fastkd.ops.options import KDOptions


def _check_backend(backend: Optional[str]) -> None:
    if backend is not None:
        requested_backend(backend)  # an unknown name fails now, not at the first forward


def _head(head):
    """An output layer as ``(weight, bias)``: an ``nn.Linear``, or the pair itself."""
    if isinstance(head, torch.nn.Linear):
        return head.weight, head.bias
    weight, bias = head
    return weight, bias


class _KDOptionsModule(torch.nn.Module):
    """A module whose KD options are one :class:`~fastkd.ops.options.KDOptions`, ``self.options``.
    Each option it takes (``OPTIONS``) also reads and writes as an attribute: ``criterion.temperature
    = 2.0`` (a temperature schedule) checks the new value as the constructor does."""

    OPTIONS = tuple(f.name for f in dataclasses.fields(KDOptions))

    def __init__(self, options: KDOptions, backend: Optional[str]):
        super().__init__()
        _check_backend(backend)
        self.options = options
        self.backend = backend

    def option_kwargs(self) -> dict:
        return {name: getattr(self.options, name) for name in self.OPTIONS}

    def __getattr__(self, name):
        if name in type(self).OPTIONS and "options" in self.__dict__:
            return getattr(self.__dict__["options"], name)
        return super().__getattr__(name)

    def __setattr__(self, name, value):
        if name in type(self).OPTIONS:
            name, value = "options", dataclasses.replace(self.options, **{name: value})
        super().__setattr__(name, value)

    def _repr_options(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self.option_kwargs().items())


class KDLoss(_KDOptionsModule):
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
        super().__init__(KDOptions(temperature, hard_weight, ignore_index, reduction, t2_scale, divergence, beta), backend)
        if teacher_weights is not None:
            one_d = isinstance(teacher_weights, torch.Tensor) and teacher_weights.dim() == 1
            _kd.validate_teacher_weights(teacher_weights, teacher_weights.shape[0] if one_d else 0)
        # A buffer, so that .to(device) moves it with the module (not saved in the state dict).
        self.register_buffer("teacher_weights", teacher_weights, persistent=False)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits, labels=labels, teacher_weights=self.teacher_weights, backend=self.backend,
                       **self.option_kwargs())

    def extra_repr(self) -> str:
        return f"{self._repr_options()}, backend={self.backend!r}"


class FusedLinearKDLoss(_KDOptionsModule):
    """Module form of :func:`fastkd.fused_linear_kd_loss`; the constructor takes its keyword
    options, checked at construction.

    ``forward(student_hidden, student_head, teacher_hidden, teacher_head, labels=None)`` takes
    the two output layers as ``nn.Linear`` modules (or ``(weight, bias)`` pairs) and returns the
    loss; the logits are never materialised. A soft-capped head (Gemma 2/3) needs its cap here
    (``student_softcap``, ``teacher_softcap``): without it the loss is that of other logits.

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
        divergence: str = "kl",
        beta: Optional[float] = None,
        student_softcap: Optional[float] = None,
        teacher_softcap: Optional[float] = None,
        chunk_size: Optional[int] = None,
        backend: Optional[str] = None,
    ):
        super().__init__(KDOptions(temperature, hard_weight, ignore_index, reduction, t2_scale, divergence, beta), backend)
        self.student_softcap = _fused_linear.check_softcap("student_softcap", student_softcap)
        self.teacher_softcap = _fused_linear.check_softcap("teacher_softcap", teacher_softcap)
        self.chunk_size = _fused_linear.check_chunk_size(chunk_size)

    def forward(self, student_hidden, student_head, teacher_hidden, teacher_head, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        w_s, b_s = _head(student_head)
        w_t, b_t = _head(teacher_head)
        return fused_linear_kd_loss(
            student_hidden, w_s, teacher_hidden, w_t, student_bias=b_s, teacher_bias=b_t, labels=labels,
            student_softcap=self.student_softcap, teacher_softcap=self.teacher_softcap,
            chunk_size=self.chunk_size, backend=self.backend, **self.option_kwargs(),
        )

    def extra_repr(self) -> str:
        return (f"{self._repr_options()}, student_softcap={self.student_softcap}, teacher_softcap={self.teacher_softcap}, "
                f"chunk_size={self.chunk_size}, backend={self.backend!r}")


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
        _check_backend(backend)
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


class SparseKDLoss(_KDOptionsModule):
    """Module form of :func:`fastkd.sparse_kd_loss` (a teacher given as top-k values and indices);
    the constructor takes its keyword options and checks them.

    ``forward(student_logits, teacher_values, teacher_indices, labels=None)`` returns the loss.

    Example::

        criterion = fastkd.nn.SparseKDLoss(temperature=2.0, values="logprobs", tail="uniform")
        loss = criterion(student(x), topk_logprobs, topk_indices)
    """

    # KL only: the options without a divergence.
    OPTIONS = ("temperature", "hard_weight", "ignore_index", "reduction", "t2_scale")

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
        super().__init__(KDOptions(temperature, hard_weight, ignore_index, reduction, t2_scale), backend)
        _sparse_kd.check_teacher_format(values, tail)
        self.values = values
        self.tail = tail

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_values: torch.Tensor,
        teacher_indices: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return sparse_kd_loss(
            student_logits, teacher_values, teacher_indices, values=self.values, tail=self.tail, labels=labels,
            backend=self.backend, **self.option_kwargs(),
        )

    def extra_repr(self) -> str:
        return f"values={self.values!r}, tail={self.tail!r}, {self._repr_options()}, backend={self.backend!r}"


class FusedLinearSparseKDLoss(_KDOptionsModule):
    """Module form of :func:`fastkd.fused_linear_sparse_kd_loss` (a teacher read from a top-k
    cache, distilled through the student's output layer); the constructor takes its keyword
    options, checked at construction.

    ``forward(student_hidden, student_head, teacher_values, teacher_indices, labels=None)`` takes
    the student's output layer as an ``nn.Linear`` (or a ``(weight, bias)`` pair) and returns the
    loss; the student's logits are never materialised. A soft-capped head (Gemma 2/3) needs its
    cap here (``student_softcap``).

    Example::

        criterion = fastkd.nn.FusedLinearSparseKDLoss(temperature=2.0, values="logprobs", tail="uniform")
        loss = criterion(hidden, model.lm_head, topk_logprobs, topk_indices, labels)
    """

    OPTIONS = SparseKDLoss.OPTIONS

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
        student_softcap: Optional[float] = None,
        chunk_size: Optional[int] = None,
        backend: Optional[str] = None,
    ):
        super().__init__(KDOptions(temperature, hard_weight, ignore_index, reduction, t2_scale), backend)
        _sparse_kd.check_teacher_format(values, tail)
        self.values, self.tail = values, tail
        self.student_softcap = _fused_linear.check_softcap("student_softcap", student_softcap)
        self.chunk_size = _fused_linear.check_chunk_size(chunk_size)

    def forward(self, student_hidden, student_head, teacher_values, teacher_indices, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        weight, bias = _head(student_head)
        return fused_linear_sparse_kd_loss(
            student_hidden, weight, teacher_values, teacher_indices, student_bias=bias, values=self.values, tail=self.tail,
            labels=labels, student_softcap=self.student_softcap, chunk_size=self.chunk_size, backend=self.backend,
            **self.option_kwargs(),
        )

    def extra_repr(self) -> str:
        return (f"values={self.values!r}, tail={self.tail!r}, {self._repr_options()}, student_softcap={self.student_softcap}, "
                f"chunk_size={self.chunk_size}, backend={self.backend!r}")


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
        _check_backend(backend)
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
        _check_backend(backend)
        self.p, self.reduction, self.backend = p, reduction, backend

    def forward(self, student_feats, teacher_feats) -> torch.Tensor:
        return attention_transfer_loss(student_feats, teacher_feats, p=self.p, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"p={self.p:g}, reduction={self.reduction!r}, backend={self.backend!r}"


class _RelationalLoss(torch.nn.Module):
    """Module form of a relational loss: ``forward(student, teacher)`` returns the loss."""

    def __init__(self, backend: Optional[str] = None):
        super().__init__()
        _check_backend(backend)
        self.backend = backend

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class RKDDistanceLoss(_RelationalLoss):
    """Module form of :func:`fastkd.rkd_distance_loss` (Park et al. 2019).

    Example::

        criterion = fastkd.nn.RKDDistanceLoss()
        loss = criterion(student_embedding, teacher_embedding)   # [B, D], [B, Dt]
    """

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return rkd_distance_loss(student, teacher, backend=self.backend)


class RKDAngleLoss(_RelationalLoss):
    """Module form of :func:`fastkd.rkd_angle_loss` (Park et al. 2019), O(B²) memory."""

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return rkd_angle_loss(student, teacher, backend=self.backend)


class SPLoss(_RelationalLoss):
    """Module form of :func:`fastkd.sp_loss` (Tung & Mori 2019, L2 row normalisation)."""

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return sp_loss(student, teacher, backend=self.backend)


class PKTLoss(_RelationalLoss):
    """Module form of :func:`fastkd.pkt_loss` (Passalis & Tefas 2018); ``eps`` is checked here,
    at construction."""

    def __init__(self, eps: float = 1e-7, *, backend: Optional[str] = None):
        super().__init__(backend)
        self.eps = _relational.validate_eps(eps)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return pkt_loss(student, teacher, eps=self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}, backend={self.backend!r}"
