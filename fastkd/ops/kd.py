"""Temperature knowledge distillation (Hinton et al. 2015), fused: the ``kd`` op family, with the
divergences of on-policy LLM distillation (reverse KL, generalized JSD, TVD, DistiLLM's skew KLs)
and ensembles of teachers.

Everything about the op lives here or is named here:

- math and contract: ``kd_loss`` below, and ``../shared/DESIGN.md`` ("The op contract");
- reference (the oracle): ``kd_loss_reference``, plain PyTorch;
- cpu kernel: ``csrc/cpu/kd_cpu.cpp`` (torch wrapper), ``csrc/cpu/kd_kernel.h`` (forward KL, one
  teacher) and ``csrc/cpu/kd_div_kernel.h`` (the other divergences and ensembles): row kernels
  compiled for AVX-512, AVX2 and scalar;
- cuda kernel: ``csrc/cuda/kd_cuda.cu``; triton kernel: ``kernels/kd.py``;
- schema: ``csrc/ops.cpp`` (``fastkd::kd_forward``); fake kernels and autograd: here;
- tests: ``tests/test_kd.py``, ``tests/test_kd_contract.py``, ``tests/test_kd_divergences.py``
  (divergences and ensembles); benchmark: ``bench/test_bench_kd.py``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from fastkd import backends
from fastkd.ops import _fused
from fastkd.ops import _validate as _validate_args


# --------------------------------------------------------------------------------------------
# Reference: plain PyTorch, computed in float32 (float64 for float64 input). Never clever.
# --------------------------------------------------------------------------------------------


# divergence -> (default beta, beta range as (low, high, high included)); None: takes no beta.
DIVERGENCES = {
    "kl": None,
    "reverse_kl": None,
    "jsd": (0.5, (0.0, 1.0, True)),
    "tvd": None,
    "skew_kl": (0.1, (0.0, 1.0, False)),
    "skew_reverse_kl": (0.1, (0.0, 1.0, False)),
}


def _plogr(w: torch.Tensor, log_w: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    """Row sums of ``w (log_w - log_r)``, an entry with ``w == 0`` counting 0 (not 0 * inf), and
    its gradient 0 there too (the difference is replaced before the product, so no 0 * NaN
    reaches the backward)."""
    return (w * torch.where(w == 0, torch.zeros_like(log_w), log_w - log_r)).sum(-1)


def resolve_divergence(divergence: str, beta: float) -> tuple:
    """The pair the kernels take: an endpoint that is another divergence becomes it (jsd at 0 is
    kl and at 1 reverse_kl, skew_kl at 0 kl, skew_reverse_kl at 0 reverse_kl)."""
    if divergence in ("jsd", "skew_kl") and beta == 0.0:
        return "kl", 0.0
    if divergence == "jsd" and beta == 1.0 or divergence == "skew_reverse_kl" and beta == 0.0:
        return "reverse_kl", 0.0
    return divergence, beta


def divergence_rows(log_p: torch.Tensor, log_q: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """Per-row divergence between the teacher ``p`` and the student ``q``, from their log-probabilities.

    ``log m`` of a mixture is a log-sum-exp of the two log-probabilities, never the log of a sum
    of probabilities, so entries whose probabilities underflow keep finite terms.
    """
    p, q = log_p.exp(), log_q.exp()
    # Entries where both distributions are 0 (masked vocabulary) contribute nothing; their logs
    # are replaced so that no -inf - -inf reaches a log-sum-exp or its backward.
    dead = (p == 0) & (q == 0)
    log_p = torch.where(dead, torch.zeros_like(log_p), log_p)
    log_q = torch.where(dead, torch.zeros_like(log_q), log_q)
    divergence, beta = resolve_divergence(divergence, beta)
    if divergence == "kl":
        return _plogr(p, log_p, log_q)
    if divergence == "reverse_kl":
        return _plogr(q, log_q, log_p)
    if divergence == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if divergence == "jsd":
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        return beta * _plogr(p, log_p, log_m) + (1.0 - beta) * _plogr(q, log_q, log_m)
    if divergence == "skew_kl":
        return _plogr(p, log_p, torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta)))
    if divergence == "skew_reverse_kl":
        return _plogr(q, log_q, torch.logaddexp(log_p + math.log1p(-beta), log_q + math.log(beta)))
    raise ValueError(f"divergence must be one of {', '.join(map(repr, DIVERGENCES))}, got {divergence!r}")


def default_beta(divergence: str, beta: Optional[float]) -> float:
    """``beta`` or, when None, the divergence's default (0.0 for those that take none)."""
    spec = DIVERGENCES.get(divergence)
    if beta is not None:
        return float(beta)
    return spec[0] if spec is not None else 0.0


def kd_loss_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    labels: Optional[torch.Tensor] = None,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    t2_scale: bool = True,
    divergence: str = "kl",
    beta: Optional[float] = None,
    teacher_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The composite ``kd_loss`` is checked against; same arguments and semantics."""
    vocab = student_logits.shape[-1]
    compute = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    beta = default_beta(divergence, beta)
    ensemble = teacher_logits.dim() == student_logits.dim() + 1
    s = student_logits.reshape(-1, vocab).to(compute)
    # Teachers as [M, N, V] (M = 1 for one teacher).
    t = teacher_logits.detach().reshape(-1, s.shape[0], vocab).to(compute)
    if labels is None:
        valid = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    else:
        labels = labels.reshape(-1)
        valid = labels != ignore_index
        # An ignored row must influence nothing: not even a NaN in it may reach the gradient
        # (softmax's backward would spread it over the row even where the loss is masked).
        s = torch.where(valid.unsqueeze(-1), s, torch.zeros_like(s))
        t = torch.where(valid.unsqueeze(-1), t, torch.zeros_like(t))
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_pm = F.log_softmax(t / temperature, dim=-1)
    if ensemble:
        # p = sum_m w_m p_m, as a log-sum-exp of the members' log-probabilities.
        n_teachers = t.shape[0]
        if teacher_weights is None:
            log_w = torch.full((n_teachers,), -math.log(n_teachers), dtype=compute, device=s.device)
        else:
            log_w = teacher_weights.detach().to(device=s.device, dtype=compute).log()
        log_p = torch.logsumexp(log_pm + log_w.view(-1, 1, 1), dim=0)
    else:
        log_p = log_pm[0]
    soft = divergence_rows(log_p, log_q, divergence, beta)
    # T * T one factor at a time, as the composite `kl_div(...) * T * T` does: T² alone
    # overflows float32 from T ≈ 1.8e19, and inf * 0 would turn an exact 0 into NaN.
    rows = soft * temperature * temperature if t2_scale else soft
    rows = (1.0 - hard_weight) * rows
    if labels is not None and hard_weight > 0:
        rows = rows + hard_weight * F.cross_entropy(s, labels, ignore_index=ignore_index, reduction="none")
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows.reshape(student_logits.shape[:-1])
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum().clamp_min(1)


# --------------------------------------------------------------------------------------------
# Registered ops: fake kernels and autograd (shared by every fused loss, fastkd/ops/_fused.py),
# the Triton twin, the backends' checks.
# --------------------------------------------------------------------------------------------


def _reference_from_op_args(student, teacher, labels, teacher_weights, divergence, beta, temperature, hard_weight, ignore_index, reduction, t2_scale, compute_grad):
    # The op's teacher is [N, V] or [M, N, V]; the student [N, V].
    return kd_loss_reference(
        student, teacher, temperature, labels=labels, hard_weight=hard_weight, ignore_index=ignore_index,
        reduction=reduction, t2_scale=t2_scale, divergence=divergence, beta=beta, teacher_weights=teacher_weights,
    )


OP = _fused.FusedLoss("kd_forward", _reference_from_op_args, reduction_arg=9)
_triton_kd, _triton_error = _fused.import_triton("fastkd.kernels.kd")
TRITON_ERROR = OP.register(_triton_kd and _triton_kd.kd_forward, _triton_error, _triton_kd and _triton_kd.kd_forward_rescale_)
_CHECKS = backends.fused_checks("kd_forward", TRITON_ERROR)


def validate_divergence(divergence, beta) -> float:
    """``divergence`` checked, and its ``beta`` (None: the default) checked and returned."""
    _validate_args.choice("divergence", divergence, tuple(DIVERGENCES))
    spec = DIVERGENCES[divergence]
    if spec is None:
        if beta is not None:
            raise ValueError(
                f"beta={beta!r} was given but divergence={divergence!r} takes no beta "
                f"(only 'jsd', 'skew_kl' and 'skew_reverse_kl' do)"
            )
        return 0.0
    if beta is None:
        return spec[0]
    lo, hi, hi_closed = spec[1]
    if not _validate_args.is_real(beta):
        raise TypeError(f"beta must be a real number (divergence={divergence!r}), got {type(beta).__name__}")
    value = float(beta)
    if not (lo <= value <= hi if hi_closed else lo <= value < hi):
        raise ValueError(f"beta must be in [{lo:g}, {hi:g}{']' if hi_closed else ')'} for divergence={divergence!r}, got {beta}")
    return value


def validate_options(temperature, hard_weight, ignore_index, reduction, t2_scale, divergence="kl", beta=None):
    """The non-tensor arguments, normalised (``nn.KDLoss`` checks them at construction)."""
    temperature = _validate_args.temperature(temperature)
    hard_weight = _validate_args.real("hard_weight", hard_weight, lo=0.0, hi=1.0)
    ignore_index = _validate_args.integer("ignore_index", ignore_index)
    _validate_args.reduction(reduction)
    _validate_args.boolean("t2_scale", t2_scale)
    beta = validate_divergence(divergence, beta)
    return temperature, hard_weight, ignore_index, beta


def validate_teacher_weights(teacher_weights, n_teachers: Optional[int]) -> None:
    """``teacher_weights``: None, or a float tensor ``[M]`` of non-negative weights summing to 1
    (the values are checked where reading them costs no device synchronisation: CPU tensors)."""
    if teacher_weights is None:
        return
    if not isinstance(teacher_weights, torch.Tensor):
        raise TypeError(f"teacher_weights must be a torch.Tensor or None, got {type(teacher_weights).__name__}")
    if not teacher_weights.dtype.is_floating_point:
        raise TypeError(f"teacher_weights must be a floating-point tensor, got {teacher_weights.dtype}")
    if teacher_weights.dim() != 1:
        raise ValueError(f"teacher_weights must be 1-D [M], got shape {tuple(teacher_weights.shape)}")
    if n_teachers is None:
        raise ValueError(
            "teacher_weights were given but teacher_logits is a single teacher (an ensemble is "
            "[M, *student_logits.shape])"
        )
    if teacher_weights.shape[0] != n_teachers:
        raise ValueError(f"teacher_weights has {teacher_weights.shape[0]} weights but teacher_logits holds {n_teachers} teachers")
    if teacher_weights.device.type == "cpu" and not torch.compiler.is_compiling():
        w = teacher_weights.detach().double()
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError(f"teacher_weights must be finite and non-negative, got {teacher_weights.tolist()}")
        total = float(w.sum())
        if abs(total - 1.0) > 1e-5:
            raise ValueError(f"teacher_weights must sum to 1, got {teacher_weights.tolist()} (sum {total:.7g})")


def _validate(student, teacher, temperature, labels, hard_weight, ignore_index, reduction, t2_scale, divergence, beta, teacher_weights):
    """The arguments as the op takes them; every error names the argument and what was wrong.
    Returns the normalised options and the number of teachers (None for a single teacher)."""
    n_teachers = _validate_args.logits_pair(student, teacher, ensemble=True)
    temperature, hard_weight, ignore_index, beta = validate_options(
        temperature, hard_weight, ignore_index, reduction, t2_scale, divergence, beta
    )
    if labels is None and hard_weight > 0:
        raise ValueError(f"hard_weight={hard_weight} > 0 needs labels (the hard term is cross-entropy with labels)")
    _validate_args.labels(labels, student, ignore_index)
    validate_teacher_weights(teacher_weights, n_teachers)
    return temperature, hard_weight, ignore_index, beta, n_teachers


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    labels: Optional[torch.Tensor] = None,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    t2_scale: bool = True,
    divergence: str = "kl",
    beta: Optional[float] = None,
    teacher_weights: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    r"""Temperature knowledge distillation (Hinton's, or with another divergence, from one teacher
    or an ensemble), loss and gradient in one fused pass.

    The teacher is a constant: no gradient flows into ``teacher_logits``, even when it requires
    grad (fastkd says so once on its logger). Only ``student_logits`` is differentiated.

    With :math:`p = \mathrm{softmax}(t/T)` (teacher) and :math:`q = \mathrm{softmax}(s/T)`
    (student), each row's loss is

    .. math::
        \ell = (1-\alpha)\, T^2\, D(p, q) + \alpha\, \mathrm{CE}(s, y)

    where the cross-entropy is taken at temperature 1 and only when ``labels`` are given and
    ``hard_weight`` :math:`\alpha > 0`. The :math:`T^2` factor (which keeps the soft gradient's
    magnitude independent of T) is dropped with ``t2_scale=False``. The divergence
    :math:`D` (``divergence``, with its ``beta`` :math:`\beta`) is one of

    * ``"kl"``: :math:`\mathrm{KL}(p\|q)`, Hinton's forward KL (takes no ``beta``);
    * ``"reverse_kl"``: :math:`\mathrm{KL}(q\|p)`, as in MiniLLM (no ``beta``);
    * ``"jsd"``: :math:`\beta\,\mathrm{KL}(p\|m) + (1-\beta)\,\mathrm{KL}(q\|m)` with
      :math:`m = \beta p + (1-\beta) q`, the generalized JSD of GKD; ``beta`` in [0, 1], default
      0.5; :math:`\beta = 0` is ``"kl"`` and :math:`\beta = 1` is ``"reverse_kl"``, as TRL's
      ``generalized_jsd_loss`` and Liger's JSD define the endpoints (the formula itself tends
      to 0 there);
    * ``"tvd"``: :math:`\tfrac12 \sum |p - q|`, total variation distance (no ``beta``);
    * ``"skew_kl"``: :math:`\mathrm{KL}(p \,\|\, \beta p + (1-\beta) q)`, DistiLLM's skew KL;
      ``beta`` in [0, 1), default 0.1 (0 is ``"kl"``);
    * ``"skew_reverse_kl"``: :math:`\mathrm{KL}(q \,\|\, (1-\beta) p + \beta q)`, DistiLLM's skew
      reverse KL; ``beta`` in [0, 1), default 0.1 (0 is ``"reverse_kl"``).

    Its gradient w.r.t. the student follows from the softmax Jacobian: with
    :math:`g = \partial D / \partial q`, :math:`\partial D / \partial (s/T) = q \odot (g - \langle q, g \rangle)`,
    e.g. :math:`q - p` for ``"kl"``, :math:`q \odot (\log q - \log p - \mathrm{KL}(q\|p))` for
    ``"reverse_kl"`` and :math:`(1-\beta)\, q \odot (\log q - \log m - \mathrm{KL}(q\|m))` for
    ``"jsd"`` (``../shared/DESIGN.md`` and ``csrc/cpu/kd_div_kernel.h`` list all of them).
    ``"tvd"`` uses the subgradient :math:`\mathrm{sign}(0) = 0`: its gradient is 0 where
    :math:`p = q`. :math:`\log m` is formed as a log-sum-exp of the two log-probabilities, never
    as the log of a sum of probabilities, so rows whose log-probabilities fall below -104 (where
    float32 probabilities are 0) give finite, correct values. The student gradient of a row is
    :math:`(1-\alpha)\,T\,\partial D/\partial(s/T) + \alpha\,(\mathrm{softmax}(s) - \mathrm{onehot}(y))`
    (:math:`1/T` instead of :math:`T` without ``t2_scale``); the fused backends compute it during
    the forward, and the backward only scales it by ``grad_output``, rounding a bfloat16/float16
    gradient once (below).

    Ensembles: ``teacher_logits`` of shape ``[M, *student_logits.shape]`` holds M teachers, and
    the teacher distribution is the mixture of their probabilities,
    :math:`p = \sum_m w_m \mathrm{softmax}(t_m / T)` (averaged probabilities, not logits; the
    ensemble distillation of Allen-Zhu & Li). The fused backends read the M teacher rows and
    never form an ``[N, V]`` mixture: the extra memory stays one ``[N, V]`` gradient.

    Rows and ``batchmean``: leading dimensions flatten into N rows, and ``"batchmean"`` divides
    by the number of *valid rows* (all N without labels). For ``[B, T, V]`` logits that is B·T,
    not B: ``F.kl_div(..., reduction="batchmean")`` on the 3-D tensors divides by B only. The
    composite is equivalent on ``logits.view(-1, V)``; for the per-sequence convention use
    ``kd_loss(..., reduction="sum") / B``.

    Args:
        student_logits: ``[..., V]`` float32, bfloat16, float16 or float64. Leading dimensions
            flatten into N rows (e.g. ``[B, T, V]`` for a language model).
        teacher_logits: same shape as ``student_logits``, or ``[M, *student_logits.shape]`` for
            an ensemble of M teachers; any floating dtype. A constant.
        temperature: T, a real number in ``[1e-30, 1e30]`` (outside it, T² or 1/T would leave
            float32's range; the scale factors are formed in double precision inside it).
        labels: optional int64 ``[...]`` (the leading shape) or ``[N]``. Rows whose label equals
            ``ignore_index`` count in neither the soft nor the hard term and influence nothing
            (a NaN in such a row leaves loss and gradient untouched).
        hard_weight: :math:`\alpha \in [0, 1]`, weight of the cross-entropy term; needs labels.
        ignore_index: any integral number (``int``, NumPy integer); marks a row to skip.
        reduction: ``"batchmean"`` (sum over valid rows / number of valid rows; 0 when every row
            is ignored), ``"sum"``, or ``"none"`` (per-row losses, shaped like the leading dims).
        t2_scale: multiply the soft term by :math:`T^2`.
        divergence: ``"kl"`` (default), ``"reverse_kl"``, ``"jsd"``, ``"tvd"``, ``"skew_kl"`` or
            ``"skew_reverse_kl"`` (the table above).
        beta: the divergence's :math:`\beta` (a real number); ``None`` means its default. Giving
            one to a divergence that has none, or outside its range, is a ``ValueError``.
        teacher_weights: for an ensemble, ``None`` (uniform, :math:`1/M` each) or a float tensor
            ``[M]`` of non-negative weights summing to 1 (checked when it is a CPU tensor, where
            that costs no device synchronisation); it may live on the CPU whatever the device.
        backend: ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``; default: the
            ``FASTKD_BACKEND`` environment variable, else the fastest for the tensors' device.
            A backend asked for explicitly that cannot run this call raises ``RuntimeError``.

    Returns:
        float32 loss (float64 for float64 input): a scalar, or the per-row losses for
        ``reduction="none"``. The gradient w.r.t. ``student_logits`` comes back in its dtype.
        ``-inf`` logits (masked vocabulary) are allowed and get zero gradient where teacher and
        student are both ``-inf``; a NaN in a valid row gives a NaN loss. An out-of-range label
        raises on CPU and gives a NaN row on GPU.

    Backward, exactly:
        * ``loss.backward()`` scales the gradient computed in the forward. A bfloat16/float16
          gradient is rounded to its dtype exactly once: when ``grad_output`` is not 1 (a loss
          weight, gradient accumulation's 1/k, per-row weights for ``reduction="none"``) the
          backward runs the kernel again with ``grad_output`` folded in before the rounding, in
          place of the forward's buffer (one more read of the inputs, no extra memory);
          ``grad_output == 1`` costs nothing. Multiplying the stored 16-bit value instead would
          round it twice (``fastkd/ops/_fused.py``).
        * Backpropagating again through a retained graph (``retain_graph=True``) is correct: the
          first backward hands its buffer to autograd, so later ones run the kernel again.
        * ``create_graph=True`` (gradient penalties, meta-learning) differentiates a composite
          formula of the same loss, so second derivatives are exact on every backend
          (``torch.autograd.gradgradcheck`` passes); that backward costs what the composite costs.
    """
    temperature, hard_weight, ignore_index, beta, n_teachers = _validate(
        student_logits, teacher_logits, temperature, labels, hard_weight, ignore_index, reduction, t2_scale,
        divergence, beta, teacher_weights,
    )
    _fused.note_constant_teacher("kd_loss", (teacher_logits,))
    name = backends.choose("kd_loss", _CHECKS, student_logits.device, backend, student_logits, teacher_logits)
    kwargs = dict(labels=labels, hard_weight=hard_weight, ignore_index=ignore_index, reduction=reduction, t2_scale=t2_scale)
    if name == "reference":
        return kd_loss_reference(
            student_logits, teacher_logits, temperature, divergence=divergence, beta=beta,
            teacher_weights=teacher_weights, **kwargs,
        )

    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab).contiguous()
    rows = student.shape[0]
    teacher_shape = (-1, vocab) if n_teachers is None else (n_teachers, rows, vocab)
    teacher = teacher_logits.detach().reshape(teacher_shape).contiguous()
    flat_labels = None if labels is None else labels.reshape(-1).contiguous()
    weights = None
    if teacher_weights is not None:
        weights = teacher_weights.detach().to(device=student.device, dtype=_fused.loss_dtype(student)).contiguous()
    compute_grad = _fused.compute_grad(student_logits)
    op = torch.ops.fastkd.kd_forward_triton if name == "triton" else torch.ops.fastkd.kd_forward
    loss, _ = op(
        student, teacher, flat_labels, weights, *resolve_divergence(divergence, beta), temperature, hard_weight, ignore_index,
        reduction, t2_scale, compute_grad,
    )
    return loss.reshape(student_logits.shape[:-1]) if reduction == "none" else loss
