"""How a call's backend is chosen (fastkd/backends.py, the op table's dispatch): the argument, then
FASTKD_BACKEND, then the first backend that can run the call; an unknown name lists the choices, an
automatic fallback is logged, and a call no backend can run lists every backend's reason. (An
explicit backend that cannot run a call, op by op: test_conformance.py.)"""

import pytest

import fastkd
from fastkd import _ext, backends
from fastkd.ops import kd as kd_ops
from kd_helpers import make_logits


def test_environment_variable_picks_the_backend(monkeypatch):
    s, _ = make_logits((2, 5))
    monkeypatch.setenv("FASTKD_BACKEND", "reference")
    assert kd_ops.KD_LOSS.choose(None, s, s) == "reference"
    # the argument wins over the environment
    if _ext.LOAD_ERROR is None:
        assert kd_ops.KD_LOSS.choose("cpu", s, s) == "cpu"


def test_unknown_backend_names_the_choices(monkeypatch):
    s, t = make_logits((2, 5))
    with pytest.raises(ValueError, match=r"backend='fast' is not a backend; choose one of reference, cpu, triton, cuda"):
        fastkd.kd_loss(s, t, backend="fast")
    monkeypatch.setenv("FASTKD_BACKEND", "gpu")
    with pytest.raises(ValueError, match="FASTKD_BACKEND='gpu'"):
        fastkd.kd_loss(s, t)


def test_automatic_fallback_is_logged(caplog):
    s, t = make_logits((2, 5))
    checks = dict(kd_ops.KD_FORWARD.checks, cpu=lambda *x: "pretend the extension is missing")
    with caplog.at_level("WARNING", logger="fastkd"):
        assert backends.choose("kd_test_fallback", checks, s.device, None, s, s) == "reference"
    assert "pretend the extension is missing" in caplog.text


def test_no_backend_fits_lists_every_reason():
    s, _ = make_logits((2, 5))
    checks = {name: (lambda *x, n=name: f"{n} refuses") for name in backends.BACKENDS}
    with pytest.raises(RuntimeError, match="cpu: cpu refuses; reference: reference refuses"):
        backends.choose("kd_loss", checks, s.device, None, s, s)
