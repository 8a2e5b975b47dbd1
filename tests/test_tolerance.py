"""The tolerance rule itself (kd_helpers.assert_within_tolerance): it accepts PyTorch's own
low-precision result, and it refuses the bugs a floor relative to the whole tensor's maximum let
through: small gradient entries set to zero, a low-magnitude row of ``reduction="none"`` wrong."""

import pytest
import torch

from kd_helpers import assert_within_tolerance, grad_output_for, make_labels, make_logits, references

# The floor the rule used to add, relative to the largest entry of the whole tensor.
WHOLE_TENSOR_FLOOR = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _grads(dtype):
    s, t = make_logits((8, 1000), dtype)
    kwargs = dict(labels=make_labels((8,), 1000, ignored=(2,)), hard_weight=0.3)
    exact, lowp, compute = references(s, t, 2.0, grad_output_for(()), **kwargs)
    return exact[1], lowp[1], compute


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_zeroing_the_small_gradient_entries_fails(dtype):
    exact, lowp, compute = _grads(dtype)
    assert_within_tolerance("grad", lowp, exact, lowp, dtype, lowp_compute=compute)  # PyTorch's own result passes
    small = exact.abs() < WHOLE_TENSOR_FLOOR[dtype] * exact.abs().max()
    # Many entries are that small (a softmax is peaked; here 85 % in bfloat16, 54 % in float16,
    # 13 % in float32): under the old floor all of them could be 0.
    assert small.double().mean() > {torch.float32: 0.1, torch.bfloat16: 0.8, torch.float16: 0.5}[dtype]
    with pytest.raises(AssertionError, match="entries over the bound"):
        assert_within_tolerance("grad", lowp.masked_fill(small, 0), exact, lowp, dtype, lowp_compute=compute)
    # Even one of them set to 0 is caught: the largest.
    i = int(torch.argmax(torch.where(small, exact.abs(), torch.zeros_like(exact)).view(-1)))
    bad = lowp.clone()
    bad.view(-1)[i] = 0
    with pytest.raises(AssertionError, match="1 of"):
        assert_within_tolerance("grad", bad, exact, lowp, dtype, lowp_compute=compute)


def test_a_low_magnitude_row_of_per_row_losses_is_checked_on_its_own_scale():
    s, t = make_logits((6, 500))
    t[3] = s[3] + 0.01 * t[3]  # row 3's loss is ~1e-4 of the others
    (exact, _), (lowp, _), _ = references(s, t, 2.0, grad_output_for((6,)), reduction="none")
    assert exact[3] < 1e-3 * exact.max()
    assert_within_tolerance("loss", lowp, exact, lowp, torch.float32)
    bad = lowp.clone()
    bad[3] *= 1.01
    with pytest.raises(AssertionError, match=r"worst at \(3,\)"):
        assert_within_tolerance("loss", bad, exact, lowp, torch.float32)
