"""The KD options object (fastkd/ops/options.py) as the nn modules hold it."""

import dataclasses

import pytest
import torch

import fastkd
from fastkd.ops.options import KDOptions
from kd_helpers import make_logits

KD_MODULES = [fastkd.nn.KDLoss, fastkd.nn.FusedLinearKDLoss]


@pytest.mark.parametrize("module", KD_MODULES)
def test_module_repr_shows_every_kd_option(module):
    m = module(temperature=3.0, hard_weight=0.25, ignore_index=-1, reduction="sum", t2_scale=False, divergence="jsd", beta=0.25)
    text = repr(m)
    for field in dataclasses.fields(KDOptions):
        assert f"{field.name}={getattr(m.options, field.name)!r}" in text, (field.name, text)


def test_module_option_set_as_attribute_is_checked_and_used():
    s, t = make_logits((3, 11), torch.float64)
    m = fastkd.nn.KDLoss(temperature=1.0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        m.temperature = -1.0
    m.temperature = 2.5
    assert m.options.temperature == 2.5
    torch.testing.assert_close(m(s, t), fastkd.kd_loss(s, t, 2.5), rtol=0, atol=0)
    with pytest.raises(ValueError, match="beta=0.5 was given but divergence='kl' takes no beta"):
        m.beta = 0.5


def test_sparse_module_takes_no_divergence():
    m = fastkd.nn.SparseKDLoss(temperature=2.0)
    assert "divergence" not in repr(m)
    with pytest.raises(TypeError, match="divergence"):
        fastkd.nn.SparseKDLoss(divergence="jsd")

