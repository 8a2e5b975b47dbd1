"""The engine's ``kind = "dkd"`` loss term: configuration, mdistiller's linear warm-up of the DKD
weight, and the example config run briefly."""

import json

import pytest
import torch

import fastkd
from engine_helpers import CONFIGS, run_config
from fastkd.engine.config import ConfigError, load_config
from fastkd.engine.losses import DKDTerm, StepOutputs, TeacherOutputs, build_terms


def test_dkd_term_defaults_are_mdistillers():
    cfg = load_config(None, [("loss", [{"kind": "dkd"}])])
    assert cfg["loss"][0] == {"kind": "dkd", "weight": 1.0, "temperature": 4.0, "alpha": 1.0, "beta": 8.0, "warmup_epochs": 20}


@pytest.mark.parametrize(
    "term,message",
    [
        ({"kind": "dkd", "beta": -1.0}, "loss\\[0\\].beta must be >= 0.0"),
        ({"kind": "dkd", "alpha": float("inf")}, "loss\\[0\\].alpha must be finite"),
        ({"kind": "dkd", "warmup_epochs": 2.5}, "loss\\[0\\].warmup_epochs must be an integer"),
        ({"kind": "dkd", "hard_weight": 0.1}, "unknown key 'loss\\[0\\].hard_weight'"),
    ],
)
def test_bad_dkd_term_is_a_config_error(term, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [("loss", [term])])


def test_warmup_schedule_is_mdistillers():
    """weight = min(epoch / warmup_epochs, 1) with epochs counted from 1; 0 turns it off."""
    (term,) = build_terms(load_config(None, [("loss", [{"kind": "dkd", "warmup_epochs": 4}])])["loss"])
    assert [term.warmup_factor(e) for e in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    (off,) = build_terms(load_config(None, [("loss", [{"kind": "dkd", "warmup_epochs": 0}])])["loss"])
    assert off.warmup_factor(0) == 1.0
    # the term's value is the warm-up factor times the fused loss on the ensemble's output
    gen = torch.Generator().manual_seed(0)
    s, t1, t2 = (torch.randn(6, 10, generator=gen) for _ in range(3))
    y = torch.randint(0, 10, (6,), generator=gen)
    teacher = TeacherOutputs([t1, t2])
    expected = fastkd.dkd_loss(s, teacher.combined(4.0), y, 4.0, alpha=1.0, beta=8.0)
    value = term(StepOutputs(s, {}, y, teacher, torch.nn.ModuleDict(), epoch=1))
    torch.testing.assert_close(value, 0.5 * expected)


def test_dkd_config_runs_and_the_trainer_applies_the_warmup(tmp_path, monkeypatch):
    seen = []
    original = DKDTerm.__call__

    def spy(self, out):
        value = original(self, out)
        t = self.spec["temperature"]
        with torch.no_grad():
            raw = fastkd.dkd_loss(out.logits.detach(), out.teacher.combined(t), out.labels, t, alpha=self.spec["alpha"], beta=self.spec["beta"])
        seen.append((out.epoch, float(value.detach() / raw)))
        return value

    monkeypatch.setattr(DKDTerm, "__call__", spy)
    example = load_config(str(CONFIGS / "dkd.toml"))["loss"]
    assert [t["kind"] for t in example] == ["ce", "dkd"] and example[1]["warmup_epochs"] == 20
    terms = [dict(example[0]), dict(example[1], warmup_epochs=2)]
    s = run_config(CONFIGS / "dkd.toml", tmp_path / "dkd", train__epochs=3, student__hidden=[16], loss=terms)
    factors = {}
    for epoch, factor in seen:
        factors.setdefault(epoch, set()).add(round(factor, 6))
    assert factors == {0: {0.5}, 1: {1.0}, 2: {1.0}}
    lines = [json.loads(l) for l in (tmp_path / "dkd" / "metrics.jsonl").read_text().splitlines()]
    val = [l for l in lines if l["model"] == "student_kd" and l["split"] == "val"]
    assert len(val) == 3 and set(val[0]["terms"]) == {"ce0", "dkd1"}
    assert all(l["terms"]["dkd1"] > 0 for l in val)
    assert 0.0 <= s["models"]["student_kd"]["agreement"] <= 1.0
