"""Argument checks shared by every op family. Each raises ``TypeError`` (wrong kind of value) or
``ValueError`` (right kind, wrong value) with a message that names the argument and says what
was wrong, before any kernel sees the input."""

from __future__ import annotations

import math
import operator
from numbers import Integral, Real
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("none", "sum", "batchmean")

# Temperatures outside this range are refused: T² and 1/T stay far inside float32 there (the
# GPU kernels take their coefficients as float32 scalars), and no distillation recipe comes
# near either end.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-30, 1e30


def is_real(x) -> bool:
    """Python and NumPy reals and 0-dim torch reals, never bool."""
    if isinstance(x, torch.Tensor):
        return x.dim() == 0 and (x.dtype.is_floating_point or not (x.dtype.is_complex or x.dtype == torch.bool))
    return isinstance(x, Real) and not isinstance(x, bool)


def real(name: str, x, *, lo: Optional[float] = None, hi: Optional[float] = None, lo_open=False, hi_open=False) -> float:
    """``x`` as a float, checked against ``[lo, hi]`` (ends open where asked)."""
    if not is_real(x):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    value = float(x)
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, got nan")
    low_bad = lo is not None and (value <= lo if lo_open else value < lo)
    high_bad = hi is not None and (value >= hi if hi_open else value > hi)
    if low_bad or high_bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        low = "-inf" if lo is None else f"{lo:g}"
        high = "inf" if hi is None else f"{hi:g}"
        raise ValueError(f"{name} must be in {left}{low}, {high}{right}, got {x}")
    return value


def temperature(x) -> float:
    if not is_real(x):
        raise TypeError(f"temperature must be a real number, got {type(x).__name__}")
    value = float(x)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {x}")
    if not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
        raise ValueError(f"temperature must be in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got {x}")
    return value


def integer(name: str, x) -> int:
    """Any integral number (int, NumPy integers, 0-dim integer tensors), never bool."""
    if isinstance(x, bool) or not (isinstance(x, Integral) or (isinstance(x, torch.Tensor) and x.dim() == 0 and not x.dtype.is_floating_point)):
        raise TypeError(f"{name} must be an integer, got {type(x).__name__}")
    return operator.index(x) if not isinstance(x, torch.Tensor) else int(x)


def boolean(name: str, x) -> bool:
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")
    return x


def choice(name: str, x, choices: Sequence[str]) -> str:
    if x not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {x!r}")
    return x


def reduction(x) -> str:
    return choice("reduction", x, REDUCTIONS)


def float_tensor(name: str, x, *, min_dim: int = 1) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16, float16 or float64), got {x.dtype}")
    if x.dim() < min_dim:
        if min_dim == 1:
            raise ValueError(f"{name} must have at least one dimension (the vocabulary), got a scalar")
        raise ValueError(f"{name} must have at least {min_dim} dimensions, got shape {tuple(x.shape)}")
    return x


def same_device(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def logits_pair(student, teacher, *, ensemble: bool = False) -> Optional[int]:
    """``student_logits`` ``[..., V]`` and ``teacher_logits`` of the same shape and device; with
    ``ensemble``, ``teacher_logits`` may also be ``[M, *student_logits.shape]`` (M teachers).
    Returns M for an ensemble, None for a single teacher."""
    float_tensor("student_logits", student)
    float_tensor("teacher_logits", teacher)
    n_teachers = None
    if ensemble and teacher.dim() == student.dim() + 1 and teacher.shape[1:] == student.shape:
        n_teachers = teacher.shape[0]
        if n_teachers == 0:
            raise ValueError(f"teacher_logits of shape {tuple(teacher.shape)} is an ensemble of 0 teachers")
    elif teacher.shape != student.shape:
        if teacher.shape[-1] != student.shape[-1]:
            raise ValueError(
                f"teacher_logits has vocabulary size {teacher.shape[-1]} but student_logits has "
                f"{student.shape[-1]} (shapes {tuple(teacher.shape)} and {tuple(student.shape)})"
            )
        also = f" (or [M, {', '.join(map(str, student.shape))}] for an ensemble of M teachers)" if ensemble else ""
        raise ValueError(f"teacher_logits shape {tuple(teacher.shape)} must equal student_logits shape {tuple(student.shape)}{also}")
    same_device("teacher_logits", teacher, "student_logits", student)
    nonempty_rows(student)
    return n_teachers


def nonempty_rows(student: torch.Tensor) -> None:
    if student.shape[-1] == 0:
        raise ValueError("student_logits has an empty vocabulary (last dimension is 0)")
    if student.numel() == 0:
        raise ValueError(f"empty batch: student_logits of shape {tuple(student.shape)} has no rows")


def labels(labels, student: torch.Tensor, ignore_index: int, *, required: bool = False, why: str = "",
           student_name: str = "student_logits", vocab: Optional[int] = None) -> None:
    """``labels`` int64, shaped like the student's leading dims (or flat ``[N]``), on its device;
    on the CPU also in ``[0, V)`` unless equal to ``ignore_index`` (a GPU check would need a host
    synchronisation: the kernels turn an out-of-range label into a NaN row instead). ``V`` is the
    student's last dimension unless ``vocab`` is given (hidden states: the head's rows)."""
    if labels is None:
        if required:
            raise ValueError(f"labels are required{why}")
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor{'' if required else ' or None'}, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be an int64 tensor, got {labels.dtype}")
    rows = student.shape[:-1]
    if labels.shape != rows and labels.shape != (student.numel() // student.shape[-1],):
        whose = student_name + ("'" if student_name.endswith("s") else "'s")
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal {whose} leading shape {tuple(rows)}")
    same_device("labels", labels, student_name, student)
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():
        vocab = student.shape[-1] if vocab is None else vocab
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            raise ValueError(f"labels holds {int(labels[bad][0])}, outside [0, {vocab}) and not ignore_index={ignore_index}")
