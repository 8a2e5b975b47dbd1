"""The cpu backend's instruction sets: it picks the best this CPU has, FASTKD_CPU_ISA forces a
lower one (kd_loss then agrees with the reference on each), and an unknown name is an error. Each
family's own kernels run on every instruction set in its test file (``test_*every_instruction_set``)."""

import re

import pytest
import torch

import fastkd
from backend_helpers import ISAS, force_isa, needs_ext
from kd_helpers import check_against_reference, make_labels, make_logits

pytestmark = needs_ext


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kd_on_every_instruction_set(isa, dtype, monkeypatch):
    force_isa(monkeypatch, isa)
    for shape in [(41, 1271), (3, 70001), (4, 5)]:
        s, t = make_logits(shape, dtype, seed=shape[1])
        kwargs = dict(labels=make_labels(shape[:-1], shape[-1], ignored=(1,)), hard_weight=0.3)
        check_against_reference("cpu", s, t, 2.0, **kwargs)
        check_against_reference("cpu", s, t, 1.0, t2_scale=False, reduction="none", **kwargs)


def test_cpu_uses_avx512_where_the_cpu_has_it(monkeypatch):
    monkeypatch.delenv("FASTKD_CPU_ISA", raising=False)
    try:
        flags = set(re.search(r"^flags\s*:(.*)$", open("/proc/cpuinfo").read(), re.M).group(1).split())
    except (OSError, AttributeError):
        pytest.skip("no /proc/cpuinfo")
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        assert torch.ops.fastkd.cpu_isa() == "avx512"
    elif {"avx2", "fma", "f16c"} <= flags:
        assert torch.ops.fastkd.cpu_isa() == "avx2"
    else:
        assert torch.ops.fastkd.cpu_isa() == "scalar"


def test_cpu_rejects_an_instruction_set_it_does_not_know(monkeypatch):
    monkeypatch.setenv("FASTKD_CPU_ISA", "sse9")
    s, t = make_logits((2, 8))
    with pytest.raises(RuntimeError, match="FASTKD_CPU_ISA=sse9"):
        fastkd.kd_loss(s, t, backend="cpu")
