"""Build fastkd and its compiled extension ``fastkd._C``.

Switches (environment variables):

    FASTKD_NO_CUDA=1          skip the CUDA sources even where nvcc is present (fast local builds)
    TORCH_CUDA_ARCH_LIST      GPU architectures to compile for (default "8.0;9.0")
    MAX_JOBS                  parallel compile jobs (default 2: the build machine has 2 cores, 24 GB)
    CUDA_HOME                 CUDA toolkit root; derived from ``nvcc --dryrun`` when unset

The CPU kernels are compiled once per instruction set (AVX-512, AVX2, scalar) and chosen at run
time, so the default build never uses ``-march=native`` and runs on any x86-64 machine.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _cuda_home_from_nvcc():
    # The nvcc on PATH may be a wrapper script in a folder that is not the toolkit root; torch
    # would then guess CUDA_HOME from that folder. nvcc's own dry run names the real root.
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "x.cu"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return str(Path(match.group(1).strip()).resolve()) if match else None


def _want_cuda():
    if os.environ.get("FASTKD_NO_CUDA", "0") not in ("", "0"):
        return False
    if not os.environ.get("CUDA_HOME"):
        home = _cuda_home_from_nvcc()
        if home is None:
            return False
        os.environ["CUDA_HOME"] = home
    return True


WANT_CUDA = _want_cuda()
os.environ.setdefault("MAX_JOBS", "2")
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

# Imported only now: torch.utils.cpp_extension reads CUDA_HOME at import time.
import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

# The extension links against this torch's C++ ABI and runs under no other: fastkd/_ext.py reads
# the version recorded here and refuses (with how to rebuild) to load under a different torch.
(ROOT / "fastkd" / "_build_torch.py").write_text(
    '"""Written by setup.py: the torch the compiled extension was built against."""\n\n'
    f"TORCH_VERSION = {torch.__version__!r}\n"
)


def _extension():
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    cxx = ["-O3", "-fopenmp", "-std=c++20", "-fvisibility=hidden"]
    kwargs = dict(
        name="fastkd._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    if not WANT_CUDA:
        return CppExtension(extra_compile_args={"cxx": cxx}, **kwargs)
    cu13 = Path(torch.__file__).resolve().parent.parent / "nvidia" / "cu13" / "include"
    if cu13.is_dir():
        kwargs["include_dirs"].append(str(cu13))
    kwargs["sources"] += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    nvcc = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "--threads", "1"]
    return CUDAExtension(
        extra_compile_args={"cxx": cxx + ["-DFASTKD_WITH_CUDA"], "nvcc": nvcc + ["-DFASTKD_WITH_CUDA"]},
        **kwargs,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
