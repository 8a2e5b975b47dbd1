"""The options of temperature KD, one checked object shared by every loss that takes them.

``kd_loss``, ``fused_linear_kd_loss`` and ``sparse_kd_loss`` (and their references and
``nn`` modules) keep their keyword arguments; each builds a :class:`KDOptions` from them, which
checks every option once (each error names the argument) and is what the rest of the call reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from fastkd.ops import _validate, divergences


@dataclass(frozen=True)
class KDOptions:
    """Checked and normalised at construction: ``temperature`` and ``hard_weight`` floats,
    ``ignore_index`` an int, ``beta`` None for a divergence that takes none, else its value (the
    divergence's default when None was given)."""

    temperature: float = 1.0
    hard_weight: float = 0.0
    ignore_index: int = -100
    reduction: str = "batchmean"
    t2_scale: bool = True
    divergence: str = "kl"
    beta: Optional[float] = None

    def __post_init__(self):
        # In the order of the public signatures, so that the first bad argument is the one named.
        set_ = object.__setattr__
        set_(self, "temperature", _validate.temperature(self.temperature))
        set_(self, "hard_weight", _validate.real("hard_weight", self.hard_weight, lo=0.0, hi=1.0))
        set_(self, "ignore_index", _validate.integer("ignore_index", self.ignore_index))
        _validate.reduction(self.reduction)
        _validate.boolean("t2_scale", self.t2_scale)
        set_(self, "beta", divergences.check(self.divergence, self.beta))

    def resolved(self) -> Tuple[str, float]:
        """``(divergence, beta)`` as the kernels take them (:func:`divergences.resolve`)."""
        return divergences.resolve(self.divergence, self.beta)

    def op_args(self) -> tuple:
        """The options as the registered KD ops take them, after their divergence or values
        arguments: ``(temperature, hard_weight, ignore_index, reduction, t2_scale)``."""
        return self.temperature, self.hard_weight, self.ignore_index, self.reduction, self.t2_scale

    def require_labels(self, labels) -> None:
        if labels is None and self.hard_weight > 0:
            raise ValueError(f"hard_weight={self.hard_weight} > 0 needs labels (the hard term is cross-entropy with labels)")

    def reference_loss(self, soft: torch.Tensor, student: torch.Tensor, labels: Optional[torch.Tensor], valid: torch.Tensor,
                       shape) -> torch.Tensor:
        """A reference's loss from its per-row divergence ``soft``: the soft term scaled, the hard
        term added, ignored rows zeroed, the reduction applied (``shape``: the rows' shape for
        ``reduction="none"``). ``student`` is the ``[N, V]`` logits in the compute dtype."""
        # T * T one factor at a time, as the composite `kl_div(...) * T * T` does: T² alone
        # overflows float32 from T ≈ 1.8e19, and inf * 0 would turn an exact 0 into NaN.
        rows = soft * self.temperature * self.temperature if self.t2_scale else soft
        rows = (1.0 - self.hard_weight) * rows
        if labels is not None and self.hard_weight > 0:
            rows = rows + self.hard_weight * F.cross_entropy(student, labels, ignore_index=self.ignore_index, reduction="none")
        return reduce_rows(torch.where(valid, rows, torch.zeros_like(rows)), valid, self.reduction, shape)


def reduce_rows(rows: torch.Tensor, valid: torch.Tensor, reduction: str, shape) -> torch.Tensor:
    """A reference's per-row losses (ignored rows already 0) reduced: ``"none"`` shaped as
    ``shape``, ``"sum"``, or ``"batchmean"`` (the sum over the number of valid rows, 0 for none)."""
    if reduction == "none":
        return rows.reshape(shape)
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum().clamp_min(1)
