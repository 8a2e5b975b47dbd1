import os

import pytest
import torch
from hypothesis import settings

# Without a GPU, Triton kernels run in its interpreter on CPU tensors. The switch is read when a
# kernel is defined, so it must be set before fastkd (and with it fastkd.kernels) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A test that forces a backend sets it itself; one left in the environment would skew them all.
os.environ.pop("FASTKD_BACKEND", None)
os.environ.pop("FASTKD_CPU_ISA", None)

# Hypothesis draws the same examples on every run and every machine ("ci", the default): a red
# run is red again when rerun, and a green one does not turn red by luck. HYPOTHESIS_PROFILE=explore
# draws fresh examples (and remembers failing ones locally) to look for new failures.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _needs_cuda(item) -> bool:
    """A test that can only run on a CUDA device: every test of a ``test_*_gpu.py`` module, and
    every case of a test parametrized with the ``cuda`` backend (or device)."""
    if item.path.name.endswith("_gpu.py"):
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(params.get(key) == "cuda" for key in ("backend", "device"))


def pytest_collection_modifyitems(config, items):
    # The `gpu` marker (pyproject.toml), so that `pytest -m gpu` runs exactly the GPU tests on a
    # GPU host, and `-m "not gpu"` the rest; where there is no CUDA device they are skipped.
    no_cuda = pytest.mark.skip(reason="no CUDA device") if not torch.cuda.is_available() else None
    for item in items:
        if _needs_cuda(item):
            item.add_marker(pytest.mark.gpu)
            if no_cuda is not None:
                item.add_marker(no_cuda)
