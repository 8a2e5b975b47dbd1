"""The CPU kernels' size-gated path: a gradient of ``kLargeGradBytes`` (8 MiB, csrc/cpu/cpu_common.h)
or more is written with non-temporal (streaming) stores by a separate loop of each row kernel,
which the small shapes of the other tests never reach. One case per kernel that has that loop,
each with what changes the gradient's formula (labels with ignored rows, the CE term at T != 1,
hard_weight > 0), against the float64 reference entry by entry.

The feature kernels' streaming loops are reached by test_feature.py's
test_large_gradients_reuse_the_cpu_buffer_and_stay_correct; the Triton and CUDA kernels have no
size-gated path (their block size follows V, and the GPU tests cover every block size).
"""

import pytest
import torch

import dkd_helpers
import kd_helpers
import sparse_kd_helpers
from fastkd import _ext

pytestmark = pytest.mark.skipif(_ext.LOAD_ERROR is not None, reason=str(_ext.LOAD_ERROR))

LARGE_GRAD_BYTES = 8 << 20  # cpu::kLargeGradBytes
SHAPE = (64, 32768)  # float32: exactly 8 MiB; V a multiple of every vector width, so every row streams
IGNORED = (3, 40)


def _large(student):
    assert student.numel() * student.element_size() >= LARGE_GRAD_BYTES
    return student


def _labels():
    return kd_helpers.make_labels(SHAPE[:-1], SHAPE[-1], ignored=IGNORED)


def test_kd_streaming_path_with_labels_and_temperature():
    """csrc/cpu/kd_kernel.h (forward KL, one teacher)."""
    s, t = kd_helpers.make_logits(SHAPE)
    kd_helpers.check_against_reference("cpu", _large(s), t, 2.5, labels=_labels(), hard_weight=0.4, reduction="none")


def test_kd_divergence_streaming_path_with_labels_and_temperature():
    """csrc/cpu/kd_div_kernel.h (the other divergences and ensembles): an ensemble of two
    teachers under the skew reverse KL, whose gradient has the most terms."""
    s, t = kd_helpers.make_logits(SHAPE)
    t2 = kd_helpers.make_logits(SHAPE, seed=7)[1]
    kd_helpers.check_against_reference("cpu", _large(s), torch.stack([t, t2]), 2.5, labels=_labels(), hard_weight=0.4,
                                       divergence="skew_reverse_kl", beta=0.2, teacher_weights=torch.tensor([0.3, 0.7]))


@pytest.mark.parametrize("values,tail", sparse_kd_helpers.TAILS)
def test_sparse_kd_streaming_path_with_labels_and_temperature(values, tail):
    """csrc/cpu/sparse_kd_kernel.h."""
    s, vals, idx = sparse_kd_helpers.make_sparse(SHAPE, 32, values=values)
    sparse_kd_helpers.check_against_reference("cpu", _large(s), vals, idx, 2.5, values=values, tail=tail, labels=_labels(), hard_weight=0.4)


def test_dkd_streaming_path_with_labels_and_temperature():
    """csrc/cpu/dkd_kernel.h (labels are DKD's target; it has no hard_weight)."""
    s, t = kd_helpers.make_logits(SHAPE)
    dkd_helpers.check_against_reference("cpu", _large(s), t, _labels(), 2.5, alpha=0.7, beta=6.0, reduction="none")
