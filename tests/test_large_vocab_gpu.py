"""The vocabularies users distil with, on a CUDA device, in both GPU backends: a Gemma-size row
(V = 262144) and Qwen's 151936, in bf16 and fp32, for the forward KL and the divergences whose
kernels hold more per row (jsd, tvd), with labels and hard_weight. Skipped where no device exists;
tools/gpu_run.py runs this file with the other GPU tests. (Their launch configurations at these
widths are compiled without a GPU, with their register use, by tests/test_gpu_static.py.)"""

import pytest
import torch

from backend_helpers import backend_params
from kd_helpers import check_against_reference, make_labels, make_logits


BACKENDS = backend_params("kd_forward", None, names=("cuda", "triton"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [151936, 262144])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("divergence", ["kl", "jsd", "tvd"])
def test_llm_vocabulary_rows(backend, vocab, dtype, divergence):
    s, t = make_logits((6, vocab), dtype, device="cuda")
    labels = make_labels((6,), vocab, ignored=(2,), device="cuda")
    check_against_reference(backend, s, t, 2.0, divergence=divergence, labels=labels, hard_weight=0.25)
