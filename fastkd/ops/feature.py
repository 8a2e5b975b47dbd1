"""Feature-matching losses, fused: FitNets hints and attention transfer (the ``feature`` family).

Everything about the two ops lives here or is named here:

- math and contract: ``hint_loss`` and ``attention_transfer_loss`` below, and
  ``docs/design.md#feature``;
- references (the oracles): ``hint_loss_reference``, ``attention_transfer_loss_reference``;
- cpu kernels: ``csrc/cpu/feature_cpu.cpp`` (torch wrapper) and ``csrc/cpu/feature_kernel.h``
  (compiled for AVX-512, AVX2 and scalar);
- cuda kernels: ``csrc/cuda/feature_cuda.cu``; triton kernels: ``kernels/feature.py``;
- schemas: ``csrc/ops.cpp`` (``fastkd::hint_forward``, ``fastkd::attention_transfer_forward``);
  fake kernels and autograd: ``fastkd/ops/fused_autograd.py``; dispatch: ``fastkd/ops/table.py``;
- tests: ``tests/test_feature*.py``.

Unlike the logit losses, the rows here are *samples*: a feature ``[B, ...]`` is flattened to
``[B, D]`` (hint) or ``[B, C, H*W]`` (attention transfer), and ``reduction="none"`` gives one
loss per sample.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from fastkd.ops import _validate, fused_autograd, table

HINT_KINDS = ("mse", "l1", "smooth_l1", "cosine", "normalized_mse")
FEATURE_REDUCTIONS = ("mean", "sum", "none")
# The eps of the reference's clamped norms: F.cosine_similarity's and F.normalize's defaults.
COSINE_EPS = 1e-8
NORMALIZE_EPS = 1e-12


# --------------------------------------------------------------------------------------------
# References: plain PyTorch, computed in float32 (float64 for float64 input). Never clever.
# --------------------------------------------------------------------------------------------


def hint_loss_reference(
    student_feat: torch.Tensor, teacher_feat: torch.Tensor, *, kind: str = "mse", reduction: str = "mean"
) -> torch.Tensor:
    """The composite ``hint_loss`` is checked against; same arguments and semantics."""
    validate_hint_options(kind, reduction)
    c = fused_autograd.loss_dtype(student_feat)
    batch = student_feat.shape[0]
    s = student_feat.reshape(batch, -1).to(c)
    t = teacher_feat.detach().reshape(batch, -1).to(c)
    if kind == "cosine":
        rows = 1.0 - F.cosine_similarity(s, t, dim=1, eps=COSINE_EPS)
        return rows if reduction == "none" else rows.sum() if reduction == "sum" else rows.mean()
    if kind == "normalized_mse":
        s, t = F.normalize(s, dim=1, eps=NORMALIZE_EPS), F.normalize(t, dim=1, eps=NORMALIZE_EPS)
    if kind in ("mse", "normalized_mse"):
        loss = F.mse_loss
    elif kind == "l1":
        loss = F.l1_loss
    else:
        loss = lambda a, b, reduction: F.smooth_l1_loss(a, b, reduction=reduction, beta=1.0)  # noqa: E731
    if reduction == "none":
        return loss(s, t, reduction="none").mean(1)
    return loss(s, t, reduction=reduction)


def attention_map_reference(feat: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """a(x) = normalize over H*W of mean over C of |x|^p: ``[B, C, *spatial]`` -> ``[B, H*W]``."""
    return F.normalize(feat.abs().pow(p).mean(1).flatten(1), dim=1, eps=NORMALIZE_EPS)


def attention_transfer_loss_reference(
    student_feats, teacher_feats, *, p: float = 2.0, reduction: str = "mean"
) -> torch.Tensor:
    """The composite ``attention_transfer_loss`` is checked against; same arguments."""
    pairs = _pairs(student_feats, teacher_feats)
    p = validate_attention_options(p, reduction)
    total = None
    for s, t in pairs:
        c = fused_autograd.loss_dtype(s)
        diff = (attention_map_reference(s.to(c), p) - attention_map_reference(t.detach().to(c), p)).pow(2)
        term = diff.mean(1) if reduction == "none" else diff.sum() if reduction == "sum" else diff.mean()
        total = term if total is None else total + term
    return total


# --------------------------------------------------------------------------------------------
# The registered ops (fastkd/ops/table.py)
# --------------------------------------------------------------------------------------------


def _hint_reference_from_op_args(student, teacher, kind, reduction, compute_grad):
    return hint_loss_reference(student, teacher, kind=kind, reduction=reduction)


def _attention_reference_from_op_args(student, teacher, p, reduction, compute_grad):
    # [B, C, HW] is a feature map with one flattened spatial dimension.
    return attention_transfer_loss_reference(student, teacher, p=p, reduction=reduction)


HINT_FORWARD = table.register_kernel("feature", "hint_forward", _hint_reference_from_op_args, reduction_arg=3)
AT_FORWARD = table.register_kernel("feature", "attention_transfer_forward", _attention_reference_from_op_args, reduction_arg=3)
HINT_TRITON_ERROR, AT_TRITON_ERROR = HINT_FORWARD.triton_error, AT_FORWARD.triton_error
HINT_LOSS = table.Op("hint_loss", "feature", HINT_FORWARD, hint_loss_reference)
ATTENTION_TRANSFER_LOSS = table.Op("attention_transfer_loss", "feature", AT_FORWARD, attention_transfer_loss_reference)


# --------------------------------------------------------------------------------------------
# Argument checks: every error names the argument and what was wrong.
# --------------------------------------------------------------------------------------------


def validate_hint_options(kind, reduction) -> None:
    _validate.choice("kind", kind, HINT_KINDS)
    _validate.choice("reduction", reduction, FEATURE_REDUCTIONS)


def validate_attention_options(p, reduction) -> float:
    p = _validate.real("p", p, lo=1.0)
    if p == float("inf"):
        raise ValueError("p must be a finite number >= 1, got inf")
    _validate.choice("reduction", reduction, FEATURE_REDUCTIONS)
    return p


def _features(name: str, x, min_dim: int, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor) and x.dtype in _validate.FLOAT_DTYPES and x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimensions ({what}), got shape {tuple(x.shape)}")
    _validate.float_tensor(name, x, min_dim=min_dim)
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    return x


def _validate_hint(student, teacher, kind, reduction) -> None:
    _features("student_feat", student, 2, "[B, ...]")
    _features("teacher_feat", teacher, 2, "[B, ...]")
    if teacher.shape != student.shape:
        raise ValueError(
            f"teacher_feat shape {tuple(teacher.shape)} must equal student_feat shape {tuple(student.shape)} "
            "(map the student to the teacher's width with a regressor module first)"
        )
    _validate.same_device("teacher_feat", teacher, "student_feat", student)
    validate_hint_options(kind, reduction)


def _pairs(student_feats, teacher_feats):
    """The (student, teacher) feature-map pairs of ``attention_transfer_loss``, checked."""
    single = isinstance(student_feats, torch.Tensor)
    if single != isinstance(teacher_feats, torch.Tensor):
        raise TypeError(
            "student_feats and teacher_feats must both be tensors or both be lists of tensors, got "
            f"{type(student_feats).__name__} and {type(teacher_feats).__name__}"
        )
    if single:
        students, teachers, names = [student_feats], [teacher_feats], [("student_feats", "teacher_feats")]
    else:
        for name, x in (("student_feats", student_feats), ("teacher_feats", teacher_feats)):
            if not isinstance(x, (list, tuple)):
                raise TypeError(f"{name} must be a tensor or a list/tuple of tensors, got {type(x).__name__}")
        if len(student_feats) != len(teacher_feats):
            raise ValueError(
                f"student_feats and teacher_feats must hold as many feature maps, got {len(student_feats)} and {len(teacher_feats)}"
            )
        if len(student_feats) == 0:
            raise ValueError("student_feats is empty: give at least one pair of feature maps")
        students, teachers = list(student_feats), list(teacher_feats)
        names = [(f"student_feats[{i}]", f"teacher_feats[{i}]") for i in range(len(students))]
    for (sn, tn), s, t in zip(names, students, teachers):
        _features(sn, s, 3, "[B, C, H, W]")
        _features(tn, t, 3, "[B, C, H, W]")
        if t.shape[0] != s.shape[0]:
            raise ValueError(f"{tn} has batch size {t.shape[0]} but {sn} has {s.shape[0]}")
        if t.shape[2:] != s.shape[2:]:
            raise ValueError(
                f"{tn} has spatial shape {tuple(t.shape[2:])} but {sn} has {tuple(s.shape[2:])} "
                "(the channel counts may differ; the spatial sizes must match)"
            )
        _validate.same_device(tn, t, sn, s)
    if len(students) > 1:
        for (sn, _), s in zip(names[1:], students[1:]):
            _validate.same_device(sn, s, names[0][0], students[0])
    return list(zip(students, teachers))


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def hint_loss(
    student_feat: torch.Tensor,
    teacher_feat: torch.Tensor,
    *,
    kind: str = "mse",
    reduction: str = "mean",
    backend: Optional[str] = None,
) -> torch.Tensor:
    r"""FitNets hint loss (Romero et al. 2015) between equal-shape features, loss and gradient in
    one fused pass.

    Features are ``[B, ...]``: sample ``b`` is the flattened row ``s_b`` of
    :math:`D = \prod` (trailing dims) entries, and ``t_b`` the teacher's. The regressor that maps
    the student's feature to the teacher's shape stays the user's module (apply it first). The
    teacher is a constant: no gradient flows into ``teacher_feat``.

    ``kind`` (with :math:`e = s - t`):

    * ``"mse"``: :math:`e^2` per entry, as ``F.mse_loss``.
    * ``"l1"``: :math:`|e|` per entry, as ``F.l1_loss`` (gradient ``sign(e)``, 0 at 0).
    * ``"smooth_l1"``: Huber with :math:`\beta = 1`, :math:`e^2/2` where :math:`|e| < 1` else
      :math:`|e| - 1/2`, as ``F.smooth_l1_loss(beta=1)``.
    * ``"cosine"``: :math:`1 - \cos(s_b, t_b)` per *sample*, exactly
      ``1 - F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1, eps=1e-8)`` (norms clamped
      at 1e-8; value and gradient as PyTorch's).
    * ``"normalized_mse"``: the MSE between the per-sample L2-normalised rows,
      ``F.mse_loss(F.normalize(s.flatten(1), dim=1), F.normalize(t.flatten(1), dim=1))`` (eps
      1e-12): a *mean over entries*, as the ``mse`` hint (``F.mse_loss``, the criterion
      RepDistiller's and torchdistill's FitNet hints use) applied to normalised rows, and as this
      engine's feature term computed it before. For rows of nonzero norm it equals
      :math:`(2 - 2\cos)/D` per sample: divide by that D (or use ``reduction="sum"``, then ``/ B``)
      for the per-sample ``2 - 2 cos`` of BYOL-style normalised regression.

    ``reduction``:

    * ``"mean"`` (default): ``mse``, ``l1``, ``smooth_l1``, ``normalized_mse``: the mean over
      all :math:`B \cdot D` entries (``F.mse_loss``'s default); ``cosine``: the mean over the B
      samples.
    * ``"sum"``: the sum over all :math:`B \cdot D` entries (``cosine``: over the samples), as
      ``reduction="sum"`` of the ``F`` losses.
    * ``"none"``: ``[B]``, one loss per sample: the mean over the sample's D entries
      (``cosine``: :math:`1 - \cos`). So ``reduction="none"`` averaged over samples is
      ``"mean"``, and for the entrywise kinds ``"sum"`` is D times its sum.

    Args:
        student_feat: ``[B, ...]`` (at least 2 dims) float32, bfloat16, float16 or float64.
        teacher_feat: same shape and device; any float dtype. A constant.
        kind: ``"mse"``, ``"l1"``, ``"smooth_l1"``, ``"cosine"`` or ``"normalized_mse"``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        backend: ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``; default: the
            ``FASTKD_BACKEND`` environment variable, else the fastest for the tensors' device.

    Returns:
        float32 loss (float64 for float64 input), a scalar or ``[B]``; the gradient w.r.t.
        ``student_feat`` comes back in its dtype and shape. A NaN in a sample gives a NaN loss
        (a NaN entry's own ``l1`` gradient is 0, as ``torch.sign``'s).

    Backward: as :func:`fastkd.kd_loss`: the forward computed the gradient and the backward only
    scales it (a 16-bit gradient rounded once: the kernel runs again when ``grad_output`` is not
    1); a retained graph may be backpropagated again; ``create_graph=True`` differentiates
    the reference composite, so second derivatives are exact on every backend.
    """
    _validate_hint(student_feat, teacher_feat, kind, reduction)
    run = HINT_LOSS.dispatch(backend, student_feat, teacher_feat)
    if run is None:
        return hint_loss_reference(student_feat, teacher_feat, kind=kind, reduction=reduction)
    batch = student_feat.shape[0]
    student = student_feat.reshape(batch, -1).contiguous()
    teacher = teacher_feat.detach().reshape(batch, -1).contiguous()
    loss, _ = run(student, teacher, kind, reduction)
    return loss


FeatureMaps = Union[torch.Tensor, Sequence[torch.Tensor]]


def attention_transfer_loss(
    student_feats: FeatureMaps,
    teacher_feats: FeatureMaps,
    *,
    p: float = 2.0,
    reduction: str = "mean",
    backend: Optional[str] = None,
) -> torch.Tensor:
    r"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017), loss and gradient in one fused pass
    per pair of feature maps.

    For a feature map ``x`` of shape ``[B, C, H, W]`` (any ``[B, C, *spatial]``), the attention
    map is the spatial map of mean absolute activation, L2-normalised over the H·W positions:

    .. math::
        a(x)_b = \frac{Q_b}{\max(\|Q_b\|_2, 10^{-12})}, \qquad
        Q_{b,j} = \frac{1}{C} \sum_c |x_{b,c,j}|^p

    (``F.normalize``'s eps: an all-zero map has attention 0 and a zero gradient, never NaN), and
    the loss of a pair is the mean over B and H·W of :math:`(a(s) - a(t))^2`. Lists of pairs
    (several stages) are summed. Student and teacher may have different channel counts; batch
    size and spatial shape must match. The teacher is a constant.

    Where the references differ: the paper's Eq. 2 writes
    :math:`\frac{\beta}{2}\sum_j \| a_s - a_t \|_p` (a norm per sample, not squared, with
    :math:`\sum_c` instead of the mean, which the normalisation cancels) while the authors' code,
    RepDistiller and torchdistill's ``ATLoss`` (``mode="code"``, its default) take
    ``(at(s) - at(t)).pow(2).mean()``; fastkd follows the latter, which the design card states,
    and leaves the paper's :math:`\beta/2` (1000/2 in the authors' CIFAR runs) to the caller's
    weight. Those implementations compute ``x.pow(p)``, not ``|x|^p``: the same for even p,
    different (and NaN for fractional p) on negative activations otherwise; fastkd uses
    :math:`|x|^p` as the paper defines. torchdistill's ``mode="paper"`` (the unsquared norm, sum
    over pairs divided by B) is not this loss.

    Args:
        student_feats: one ``[B, C_s, H, W]`` tensor or a list/tuple of them; float32,
            bfloat16, float16 or float64.
        teacher_feats: the same structure: ``[B, C_t, H, W]`` per pair, same B and spatial shape
            as its student map, same device; a constant.
        p: exponent of :math:`|x|^p`, a finite real :math:`\ge 1` (below 1 the gradient is
            infinite at zero activations). p = 1, 2, 3, 4 run vectorised on the CPU backend;
            other values run entry by entry there, more slowly.
        reduction: ``"mean"`` (default: over B and H·W, as above), ``"sum"`` (over B and H·W)
            or ``"none"`` (``[B]``: each sample's mean over H·W, summed over the pairs).
        backend: as for :func:`fastkd.hint_loss`.

    Returns:
        float32 loss (float64 for float64 input). The gradient flows into every student map,
        in its dtype. Backward semantics as :func:`fastkd.hint_loss`.
    """
    pairs = _pairs(student_feats, teacher_feats)
    p = validate_attention_options(p, reduction)
    total = None
    for s, t in pairs:
        run = ATTENTION_TRANSFER_LOSS.dispatch(backend, s, t)
        if run is None:
            term = attention_transfer_loss_reference(s, t, p=p, reduction=reduction)
        else:
            student = s.reshape(s.shape[0], s.shape[1], -1).contiguous()
            teacher = t.detach().reshape(t.shape[0], t.shape[1], -1).contiguous()
            term, _ = run(student, teacher, p, reduction)
        total = term if total is None else total + term
    return total
