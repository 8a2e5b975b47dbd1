import os

import torch

# Without a GPU, Triton kernels run in its interpreter on CPU tensors. The switch is read when a
# kernel is defined, so it must be set before fastkd (and with it fastkd.kernels) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A test that forces a backend sets it itself; one left in the environment would skew them all.
os.environ.pop("FASTKD_BACKEND", None)
os.environ.pop("FASTKD_CPU_ISA", None)
