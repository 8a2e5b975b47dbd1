"""Loads the compiled extension ``fastkd._C`` and records why, when it cannot be loaded."""

import torch

try:
    from fastkd._build_torch import TORCH_VERSION as BUILT_WITH_TORCH  # written by setup.py
except ImportError:
    BUILT_WITH_TORCH = None

_C = None
if BUILT_WITH_TORCH is not None and BUILT_WITH_TORCH != torch.__version__:
    # A C++ extension runs only under the torch it was compiled against: loading it under another
    # fails with an undefined symbol at best. The package still works, more slowly, without it.
    LOAD_ERROR = (
        f"the compiled extension fastkd._C was built against torch {BUILT_WITH_TORCH} and this is torch "
        f"{torch.__version__}; rebuild it against this torch with "
        "`pip install --no-build-isolation --no-deps --force-reinstall fastkd` (or `-e .` in a checkout)"
    )
else:
    try:
        from fastkd import _C  # noqa: F401  (importing registers the C++ ops)

        LOAD_ERROR = None
    except ImportError as exc:  # the package also works, more slowly, without it
        LOAD_ERROR = f"the compiled extension fastkd._C could not be imported ({exc})"


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``fastkd::<op>`` has a kernel registered for ``dispatch_key`` ("CPU", "CUDA")."""
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastkd::{op}", dispatch_key)


def empty_cache() -> int:
    """Frees the gradient buffer the CPU kernels keep for reuse between calls (see
    ``csrc/cpu/kd_cpu.cpp``); returns the bytes it held. It is kept because a fresh buffer of that
    size costs as much to fault in as the kernel's own work; this gives the memory back."""
    return torch.ops.fastkd.cpu_empty_cache() if _C is not None else 0
