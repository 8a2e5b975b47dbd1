"""The divergences of ``kd_loss`` (and of the losses built on it), decided here and only here.

For each divergence: whether it takes a ``beta``, its default and range, the endpoints at which
it *is* another divergence, and the factor k of its student gradient
``dD/d(s/T) = k q (x - <q, x>)`` (``docs/design.md#divergences`` derives x and k for each).

The public functions check ``(divergence, beta)`` with :func:`check` and hand the kernels the
pair :func:`resolve` gives: an endpoint collapsed to the divergence it equals (jsd at beta 0 is
kl, at 1 reverse_kl; skew_kl at 0 is kl, skew_reverse_kl at 0 is reverse_kl), so that every
backend computes an endpoint with the other divergence's code, never with a formula that tends
to 0/0 there. The C++ extension keeps a parser of its own for direct calls of the registered
op; ``tests/test_divergence_table.py`` checks that every backend agrees with this table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

from fastkd.ops import _validate


@dataclass(frozen=True)
class Divergence:
    name: str
    # None: takes no beta. Else (default, high end, whether the high end is allowed); beta >= 0.
    beta: Optional[Tuple[float, float, bool]] = None
    # beta -> the divergence it equals there.
    endpoints: Dict[float, str] = field(default_factory=dict)
    # The factor k of the student gradient, as a function of beta.
    grad_factor: Callable[[float], float] = lambda beta: 1.0

    def beta_range(self) -> str:
        _, high, closed = self.beta
        return f"[0, {high:g}{']' if closed else ')'}"


DIVERGENCES: Dict[str, Divergence] = {
    d.name: d
    for d in (
        Divergence("kl"),
        Divergence("reverse_kl"),
        Divergence("jsd", (0.5, 1.0, True), {0.0: "kl", 1.0: "reverse_kl"}, lambda beta: 1.0 - beta),
        Divergence("tvd", grad_factor=lambda beta: 0.5),
        Divergence("skew_kl", (0.1, 1.0, False), {0.0: "kl"}, lambda beta: 1.0 - beta),
        Divergence("skew_reverse_kl", (0.1, 1.0, False), {0.0: "reverse_kl"}),
        Divergence("hellinger", grad_factor=lambda beta: 0.5),
    )
}
TAKE_BETA = tuple(name for name, d in DIVERGENCES.items() if d.beta is not None)


def check(divergence, beta) -> Optional[float]:
    """``divergence`` checked, and its ``beta``: None for a divergence that takes none, else the
    given value (a real number in the divergence's range) or, when None, the default."""
    _validate.choice("divergence", divergence, tuple(DIVERGENCES))
    spec = DIVERGENCES[divergence]
    if spec.beta is None:
        if beta is not None:
            names = ", ".join(map(repr, TAKE_BETA[:-1])) + f" and {TAKE_BETA[-1]!r}"
            raise ValueError(f"beta={beta!r} was given but divergence={divergence!r} takes no beta (only {names} do)")
        return None
    if beta is None:
        return spec.beta[0]
    if not _validate.is_real(beta):
        raise TypeError(f"beta must be a real number (divergence={divergence!r}), got {type(beta).__name__}")
    value = float(beta)
    _, high, closed = spec.beta
    if not (0.0 <= value <= high if closed else 0.0 <= value < high):
        raise ValueError(f"beta must be in {spec.beta_range()} for divergence={divergence!r}, got {beta}")
    return value


def resolve(divergence: str, beta: Optional[float]) -> Tuple[str, float]:
    """The checked pair as the kernels take it: an endpoint becomes the divergence it equals, and
    a divergence without beta gets 0.0 (the registered ops' ``beta`` is a float)."""
    collapsed = DIVERGENCES[divergence].endpoints.get(beta)
    if collapsed is not None:
        return collapsed, 0.0
    return divergence, 0.0 if beta is None else beta


def grad_factor(divergence: str, beta: float) -> float:
    """k of the student gradient ``k q (x - <q, x>)`` of a resolved pair."""
    return DIVERGENCES[divergence].grad_factor(beta)


def beta_argument(divergence: str, beta: float) -> Optional[float]:
    """The inverse of :func:`resolve`'s float: None where the divergence takes no beta (a
    registered op's arguments turned back into the public function's)."""
    return None if DIVERGENCES[divergence].beta is None else beta
