"""fastkd's Triton kernels, one module per op family (installed as ``fastkd.kernels``).

The convention every module here follows: launch configurations in one place
------------------------------------------------------------------------------
No GPU is available where fastkd is built and tested, so ``tests/test_gpu_static.py`` compiles
every launch a launcher can make, for sm_80 and sm_90, and fails on a compile error or on a
register spill; ``make bench`` reports the kernels' resources (``tools/gpu_static.py`` does
both). Both find the launches through one function, so that a new family is covered by writing
it, with no change to the test or the report:

* A module ``kernels/<family>.py`` that defines ``@triton.jit`` kernels defines
  ``static_launches() -> list[StaticLaunch]``: the launches its launcher can make. The test fails
  for a top-level ``@triton.jit`` function that no listed launch reaches: neither launched nor
  called, directly or through other helpers, by a launched kernel.
* A helper module (``kernels/_softmax.py``: the online-softmax skeleton the row kernels share)
  defines ``@triton.jit`` functions that the families' kernels call and no launches: it has no
  ``static_launches``, and its functions are compiled inside every kernel that calls them.
* The launcher must choose its configuration (block sizes, ``num_warps``, constexpr switches)
  by calling the same module-level functions or constants that ``static_launches`` enumerates,
  never with a rule of its own inline: that is what keeps the checked set and the launched set
  the same. The row kernels share one shape rule (``_softmax.launch_shape()``: the row rounded
  up to a power of two, capped per kernel, and ``num_warps_for()``); ``kernels/kd.py`` is the
  example: ``launch_config()``, ``switches()`` and ``m_pad_for()`` at its top.
* ``StaticLaunch.args`` holds every kernel parameter as the launcher passes it: a
  ``torch.dtype`` for a tensor (compiled as a 16-byte aligned tensor, as torch allocates them),
  ``None`` for an absent optional pointer, a Python ``int``/``float`` for a scalar, the value of
  each ``tl.constexpr``. Triton specialises on the values of integers (an int equal to 1 becomes
  a constant; one divisible by 16 lets loads vectorise), so choose them as real launches would,
  and add a launch with a non-multiple of 16 where the row length can be one.
* A float scalar parameter is cast to fp32 on the kernel's first lines, with
  ``x = tl.cast(x, tl.float32)`` or a helper that does (``_softmax.kd_scalars``; the interpreter
  passes a Python float, which has no ``.to``).
  A direct launch types a Python float as fp32, but torch.compile, which launches these kernels
  from the graphs it traces, types it as fp64: without the cast, a loop-carried fp32 value
  updated with such a scalar fails to compile, and other arithmetic silently runs in fp64 (slow
  on most GPUs). The test lowers every launch with fp64 scalars as well and fails on either.
* If literally every combination is too slow to compile (the whole check must stay within a few
  minutes of ``make test`` on 2 cores), reduce it the way ``kernels/kd.py`` does and say in that
  module's ``static_launches`` docstring exactly what is covered and what is not.

CUDA C++ kernels (``csrc/cuda``) need no list: every kernel in ``fastkd/_C*.so`` is read with
``cuobjdump``. Each declares beside its launcher, with ``FASTKD_GPU_KERNEL_INFO`` from
``csrc/cuda/gpu_kernel_info.h``, the block sizes its launcher chooses from and the bytes it
moves per row; the test fails for a kernel without that declaration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple


@dataclass(frozen=True)
class StaticLaunch:
    """One launch a launcher can make, as ``tools/gpu_static.py`` compiles it.

    kernel:     the ``@triton.jit`` function.
    args:       every parameter of the kernel by name, as described in the module docstring.
    num_warps:  as passed at launch; ``num_stages`` likewise (None: Triton's default).
    label:      the configuration this launch is one case of, one row of the report, e.g.
                ``"fp32 · BLOCK_V=4096 · 8 warps"``. Launches that share a label (the switch
                combinations compiled at that configuration) are folded into its row.
    variant:    what distinguishes it within its label, e.g. ``"labels, CE, grad"``.
    row_bytes:  (a, b): the launch moves at least a * row_length + b bytes per row (reads and
                writes each counted once): the memory-traffic bound a GPU measurement compares
                with.
    """

    kernel: Any
    args: Mapping[str, Any]
    num_warps: int
    label: str
    variant: str = ""
    row_bytes: Tuple[int, int] = (0, 0)
    num_stages: Optional[int] = None


# Helpers the families' static_launches() share.
DTYPE_NAMES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


def dtype_label(student, teacher=None) -> str:
    """``fp32``, or ``fp32/bf16`` when the teacher's dtype differs."""
    s = DTYPE_NAMES[str(student)]
    return s if teacher is None or teacher == student else f"{s}/{DTYPE_NAMES[str(teacher)]}"


def shape_label(block: int, num_warps: int, name: str = "BLOCK_V") -> str:
    return f"{name}={block} · {num_warps} warp{'s' if num_warps > 1 else ''}"


# grad_scale (fastkd/ops/fused_autograd.py): every fused kernel takes ``go_ptr`` and two constexprs,
# GO_MODE (0: no grad_scale; 1: one value; 2: one per row, go_ptr[row]) and GO_SKIP (the kernel
# rewrites the forward's gradient in place: a program whose scale is exactly 1 returns at once).
# The scale multiplies the float32 gradient coefficient, before the one rounding to the
# student's dtype.
GRAD_SCALE_OFF = dict(GO_MODE=0, GO_SKIP=False)
# What static_launches compiles besides GRAD_SCALE_OFF: the backward's in-place rescale (one
# value, one per row) and the traced backward's fresh gradient (one per row).
GRAD_SCALE_ON = (dict(GO_MODE=1, GO_SKIP=True), dict(GO_MODE=2, GO_SKIP=True), dict(GO_MODE=2, GO_SKIP=False))


def grad_scale_switches(grad_scale, in_place: bool) -> dict:
    """GO_MODE and GO_SKIP for a launch with ``grad_scale`` (None, or 1 or N elements),
    rewriting the forward's gradient (``in_place``) or writing a fresh one."""
    if grad_scale is None:
        return dict(GRAD_SCALE_OFF)
    return dict(GO_MODE=1 if grad_scale.numel() == 1 else 2, GO_SKIP=in_place)


def grad_scale_variant(switches: Mapping[str, Any]) -> str:
    """The grad_scale part of a static launch's variant label."""
    mode = switches["GO_MODE"]
    if mode == 0:
        return "no grad_scale"
    return ("per-row " if mode == 2 else "") + "grad_scale" + (", in place" if switches["GO_SKIP"] else "")


def largest_per_warp_count(shapes) -> list:
    """Of (block, num_warps) pairs, the largest block of each warp count: where a thread holds
    the most elements, so register pressure peaks."""
    shapes = sorted(set(shapes))
    return [max(s for s in shapes if s[1] == w) for w in sorted({w for _, w in shapes})]
