"""The compiled extension: it is built (with the CUDA sources wherever nvcc is present), and runs only
under the torch it was built against (fastkd/_ext.py)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastkd import _ext

ROOT = Path(__file__).resolve().parent.parent


def test_this_build_records_the_torch_it_was_built_against():
    # setup.py writes fastkd/_build_torch.py; `make build` built it against the torch running here.
    assert _ext.BUILT_WITH_TORCH == torch.__version__
    assert _ext.LOAD_ERROR is None


def test_another_torch_refuses_the_extension_and_the_losses_still_run():
    code = """
import sys, types
fake = types.ModuleType("fastkd._build_torch"); fake.TORCH_VERSION = "2.0.0+old"
sys.modules["fastkd._build_torch"] = fake
import torch, fastkd
from fastkd import _ext
print(_ext.LOAD_ERROR)
assert "fastkd._C" not in sys.modules, "the extension was loaded under another torch"
s = torch.randn(3, 7, dtype=torch.float64, requires_grad=True); t = torch.randn(3, 7, dtype=torch.float64)
loss = fastkd.kd_loss(s, t, temperature=2.0)
loss.backward()
ref = fastkd.kd_loss(s.detach(), t, temperature=2.0, backend="reference")
assert torch.equal(loss.detach(), ref), (loss, ref)
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    msg = run.stdout.strip().splitlines()[0]
    assert "built against torch 2.0.0+old" in msg and torch.__version__ in msg and "--no-build-isolation" in msg


def test_extension_is_built():
    assert _ext.LOAD_ERROR is None, _ext.LOAD_ERROR


@pytest.mark.skipif(_ext.LOAD_ERROR is not None, reason=str(_ext.LOAD_ERROR))
def test_cuda_is_compiled_wherever_nvcc_is_present():
    if os.environ.get("FASTKD_NO_CUDA", "0") not in ("", "0"):
        pytest.skip("FASTKD_NO_CUDA is set: the CUDA build was skipped on purpose")
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        pytest.skip("no nvcc here")
    assert torch.ops.fastkd.built_with_cuda(), "nvcc is present but the CUDA sources were not compiled (was it built with FASTKD_NO_CUDA=1?)"
