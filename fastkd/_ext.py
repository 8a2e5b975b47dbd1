"""Loads the compiled extension ``fastkd._C`` and records why, when it cannot be loaded."""

import torch

try:
    from fastkd import _C  # noqa: F401  (importing registers the C++ ops)

    LOAD_ERROR = None
except ImportError as exc:  # the package also works, more slowly, without it
    _C = None
    LOAD_ERROR = f"the compiled extension fastkd._C could not be imported ({exc})"


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``fastkd::<op>`` has a kernel registered for ``dispatch_key`` ("CPU", "CUDA")."""
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastkd::{op}", dispatch_key)
