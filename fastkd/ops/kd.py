"""Temperature knowledge distillation (Hinton et al. 2015), fused: the ``kd`` op family, with the
divergences of on-policy LLM distillation (reverse KL, generalized JSD, TVD, DistiLLM's skew KLs,
the squared Hellinger distance) and ensembles of teachers.

Everything about the op lives here or is named here:

- math and contract: ``kd_loss`` below, and ``docs/design.md#kd`` (``#divergences`` for the
  divergences, ``#op-contract`` for what every op promises);
- options: ``fastkd/ops/options.py`` (``KDOptions``) and ``fastkd/ops/divergences.py`` (beta
  ranges, endpoints, gradient factors), shared with ``sparse_kd`` and ``fused_linear``;
- reference (the oracle): ``kd_loss_reference``, plain PyTorch;
- cpu kernels: ``csrc/cpu/kd_cpu.cpp`` (torch wrapper) and the row kernels it includes (forward
  KL with one teacher; the other divergences and ensembles), compiled for AVX-512, AVX2 and scalar;
- cuda kernel: ``csrc/cuda/kd_cuda.cu``; triton kernel: ``kernels/kd.py``;
- schema: ``csrc/ops.cpp`` (``fastkd::kd_forward``); fake kernels and autograd:
  ``fastkd/ops/fused_autograd.py``; dispatch: ``fastkd/ops/table.py``;
- tests: ``tests/test_kd.py``, ``tests/test_kd_contract.py``, ``tests/test_kd_divergences.py``
  (divergences and ensembles); benchmark: ``bench/test_bench_kd.py``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from fastkd.ops import _validate, divergences, fused_autograd, table
from fastkd.ops.options import KDOptions


# --------------------------------------------------------------------------------------------
# Reference: plain PyTorch, computed in float32 (float64 for float64 input). Never clever.
# --------------------------------------------------------------------------------------------


def _plogr(w: torch.Tensor, log_w: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    """Row sums of ``w (log_w - log_r)``, an entry with ``w == 0`` counting 0 (not 0 * inf), and
    its gradient 0 there too (the difference is replaced before the product, so no 0 * NaN
    reaches the backward)."""
    return (w * torch.where(w == 0, torch.zeros_like(log_w), log_w - log_r)).sum(-1)


def divergence_rows(log_p: torch.Tensor, log_q: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """Per-row divergence between the teacher ``p`` and the student ``q``, from their
    log-probabilities, for a resolved ``(divergence, beta)`` (``divergences.resolve``: an
    endpoint is already the divergence it equals).

    ``log m`` of a mixture is a log-sum-exp of the two log-probabilities, never the log of a sum
    of probabilities, so entries whose probabilities underflow keep finite terms.
    """
    p, q = log_p.exp(), log_q.exp()
    # Entries where both distributions are 0 (masked vocabulary) contribute nothing; their logs
    # are replaced so that no -inf - -inf reaches a log-sum-exp or its backward.
    dead = (p == 0) & (q == 0)
    log_p = torch.where(dead, torch.zeros_like(log_p), log_p)
    log_q = torch.where(dead, torch.zeros_like(log_q), log_q)
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
    if divergence == "hellinger":
        # A sum of non-negative terms (1 - sum sqrt(p q) cancels near p = q), with sqrt q taken as
        # e^(log q / 2): its derivative in log q, sqrt(q) / 2, is finite at q = 0 where sqrt's is not.
        return 0.5 * ((0.5 * log_p).exp() - (0.5 * log_q).exp()).square().sum(-1)
    raise ValueError(f"divergence must be one of {', '.join(map(repr, divergences.DIVERGENCES))}, got {divergence!r}")


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
    options = KDOptions(temperature, hard_weight, ignore_index, reduction, t2_scale, divergence, beta)
    return _reference(student_logits, teacher_logits, options, labels, teacher_weights)


def _reference(student_logits, teacher_logits, options: KDOptions, labels, teacher_weights) -> torch.Tensor:
    vocab = student_logits.shape[-1]
    compute = fused_autograd.loss_dtype(student_logits)
    ensemble = teacher_logits.dim() == student_logits.dim() + 1
    s = student_logits.reshape(-1, vocab).to(compute)
    # Teachers as [M, N, V] (M = 1 for one teacher).
    t = teacher_logits.detach().reshape(-1, s.shape[0], vocab).to(compute)
    if labels is None:
        valid = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    else:
        labels = labels.reshape(-1)
        valid = labels != options.ignore_index
        # An ignored row must influence nothing: not even a NaN in it may reach the gradient
        # (softmax's backward would spread it over the row even where the loss is masked).
        s = torch.where(valid.unsqueeze(-1), s, torch.zeros_like(s))
        t = torch.where(valid.unsqueeze(-1), t, torch.zeros_like(t))
    log_q = F.log_softmax(s / options.temperature, dim=-1)
    log_pm = F.log_softmax(t / options.temperature, dim=-1)
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
    soft = divergence_rows(log_p, log_q, *options.resolved())
    return options.reference_loss(soft, s, labels, valid, student_logits.shape[:-1])


# --------------------------------------------------------------------------------------------
# The registered op (fastkd/ops/table.py) and the checks of the arguments
# --------------------------------------------------------------------------------------------


def _reference_from_op_args(student, teacher, labels, teacher_weights, divergence, beta, temperature, hard_weight, ignore_index,
                            reduction, t2_scale, compute_grad):
    # The op's teacher is [N, V] or [M, N, V]; the student [N, V]; (divergence, beta) resolved.
    options = KDOptions(temperature, hard_weight, ignore_index, reduction, t2_scale, divergence,
                        divergences.beta_argument(divergence, beta))
    return _reference(student, teacher, options, labels, teacher_weights)


KD_FORWARD = table.register_kernel("kd", "kd_forward", _reference_from_op_args, reduction_arg=9)
TRITON_ERROR = KD_FORWARD.triton_error
KD_LOSS = table.Op("kd_loss", "kd", KD_FORWARD, kd_loss_reference, variants=tuple(d for d in divergences.DIVERGENCES if d != "kl") + ("ensemble",))


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


def _check_tensors(student, teacher, options: KDOptions, labels, teacher_weights) -> Optional[int]:
    """The tensors as the op takes them; every error names the argument and what was wrong.
    Returns the number of teachers (None for a single teacher)."""
    n_teachers = _validate.logits_pair(student, teacher, ensemble=True)
    options.require_labels(labels)
    _validate.labels(labels, student, options.ignore_index)
    validate_teacher_weights(teacher_weights, n_teachers)
    return n_teachers


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
      reverse KL; ``beta`` in [0, 1), default 0.1 (0 is ``"reverse_kl"``);
    * ``"hellinger"``: :math:`\tfrac12 \sum (\sqrt{p} - \sqrt{q})^2 = 1 - \sum \sqrt{p q}`, the
      squared Hellinger distance (no ``beta``); finite where :math:`q = 0 < p`, unlike ``"kl"``.

    Its gradient w.r.t. the student follows from the softmax Jacobian: with
    :math:`g = \partial D / \partial q`, :math:`\partial D / \partial (s/T) = q \odot (g - \langle q, g \rangle)`,
    e.g. :math:`q - p` for ``"kl"``, :math:`q \odot (\log q - \log p - \mathrm{KL}(q\|p))` for
    ``"reverse_kl"`` and :math:`(1-\beta)\, q \odot (\log q - \log m - \mathrm{KL}(q\|m))` for
    ``"jsd"`` (``docs/design.md#divergences`` lists all of them).
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
        divergence: ``"kl"`` (default), ``"reverse_kl"``, ``"jsd"``, ``"tvd"``, ``"skew_kl"``,
            ``"skew_reverse_kl"`` or ``"hellinger"`` (the list above).
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
          round it twice (``fastkd/ops/fused_autograd.py``).
        * Backpropagating again through a retained graph (``retain_graph=True``) is correct: the
          first backward hands its buffer to autograd, so later ones run the kernel again.
        * ``create_graph=True`` (gradient penalties, meta-learning) differentiates a composite
          formula of the same loss, so second derivatives are exact on every backend
          (``torch.autograd.gradgradcheck`` passes); that backward costs what the composite costs.
    """
    options = KDOptions(temperature, hard_weight, ignore_index, reduction, t2_scale, divergence, beta)
    n_teachers = _check_tensors(student_logits, teacher_logits, options, labels, teacher_weights)
    run = KD_LOSS.dispatch(backend, student_logits, teacher_logits)
    if run is None:
        return _reference(student_logits, teacher_logits, options, labels, teacher_weights)

    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab).contiguous()
    rows = student.shape[0]
    teacher_shape = (-1, vocab) if n_teachers is None else (n_teachers, rows, vocab)
    teacher = teacher_logits.detach().reshape(teacher_shape).contiguous()
    flat_labels = None if labels is None else labels.reshape(-1).contiguous()
    weights = None
    if teacher_weights is not None:
        weights = teacher_weights.detach().to(device=student.device, dtype=fused_autograd.loss_dtype(student)).contiguous()
    loss, _ = run(student, teacher, flat_labels, weights, *options.resolved(), *options.op_args())
    return loss.reshape(student_logits.shape[:-1]) if reduction == "none" else loss
