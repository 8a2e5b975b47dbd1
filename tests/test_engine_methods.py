"""Every example config runs (a few epochs) and moves the metric its method should move.

The most direct effect of distillation is fidelity: a distilled student's predictive KL to its
teacher(s) falls below that of the same architecture trained on labels alone. Each method adds
its own check (sparsity, quantization levels, feature distances, peers' agreement, ...).
"""

import json

import pytest

from engine_helpers import CONFIGS, run_config

EPOCHS = 8


def _run(name, tmp_path, **overrides):
    s = run_config(CONFIGS / f"{name}.toml", tmp_path / name, **{"train__epochs": EPOCHS, **overrides})
    lines = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return s["models"], s, lines


def _fidelity_improves(m):
    assert m["student_kd"]["predictive_kl"] < m["student_baseline"]["predictive_kl"]


def test_hinton_single_teacher(tmp_path):
    m, _, lines = _run("hinton", tmp_path)
    _fidelity_improves(m)
    # The fused KD+CE term is the only term and decreases.
    kd = [l["terms"]["kd0"] for l in lines if l["model"] == "student_kd" and l["split"] == "val"]
    assert kd[-1] < 0.5 * kd[0]


def test_feature_hint_with_regressor_in_a_weighted_sum(tmp_path):
    m, _, lines = _run("features", tmp_path)
    _fidelity_improves(m)
    val = [l for l in lines if l["model"] == "student_kd" and l["split"] == "val"]
    assert set(val[0]["terms"]) == {"kd0", "feature1", "feature2", "ce3"}
    # The student's 64-wide block, through the learned regressor, approaches the teacher's 256-wide one.
    assert val[-1]["terms"]["feature1"] < 0.5 * val[0]["terms"]["feature1"]
    # and arranges the batch as the teacher's does
    assert val[-1]["terms"]["feature2"] < val[0]["terms"]["feature2"]
    from fastkd.engine import checkpoint as ckpt

    state = ckpt.load(str(tmp_path / "features" / "checkpoint.pt"))
    assert "student_kd" in state["store"]  # (regressors are training-only and not part of the model)


def test_ensemble_on_multiview_data(tmp_path):
    m, s, _ = _run("multiview", tmp_path)
    assert s["data"]["name"] == "multiview"
    _fidelity_improves(m)
    members = [v["nll"] for k, v in m.items() if k.startswith("teacher_")]
    assert len(members) == 4 and m["teacher"]["nll"] < sum(members) / len(members)  # ensembling helps


def test_self_distillation_generations(tmp_path):
    m, _, lines = _run("self_distill", tmp_path)
    assert {"generation_0", "generation_1", "generation_2"} <= set(m)
    # The last generation matches its teacher (generation 1) better than a model trained alone.
    _fidelity_improves(m)
    assert {l["phase"] for l in lines} >= {"generation_0", "generation_1", "generation_2"}


def test_mutual_learning_peers_agree(tmp_path):
    m, _, _ = _run("mutual", tmp_path)
    # Peers that teach each other agree more than two models trained alone from the same seeds.
    assert m["student_kd"]["agreement"] > m["student_baseline"]["agreement"]
    assert m["peer_0"]["predictive_kl"] < m["independent_0"]["predictive_kl"]


def test_stagewise(tmp_path):
    m, s, lines = _run("stagewise", tmp_path)
    phases = [l["phase"] for l in lines if l["model"] == "student_kd" and l["split"] == "val"]
    assert phases == ["stage_0"] * EPOCHS + ["stage_1"] * EPOCHS + ["head"] * EPOCHS
    for stage in ("stage_0", "stage_1"):
        mse = [l["terms"]["feature0"] for l in lines if l["phase"] == stage]
        assert mse[-1] < 0.5 * mse[0], stage  # each stage learns the teacher's feature map
    assert m["student_kd"]["accuracy"] > 0.5  # the head on top of the matched features works
    assert s["data"]["train"] > 0


def test_label_noise_robustness(tmp_path):
    m, s, _ = _run("label_noise", tmp_path)
    assert s["data"]["noisy_labels"] == round(0.4 * s["data"]["train"])
    # The student taught by the ensemble's averaged output fits the noisy labels less than the
    # baseline and is more accurate on the clean test split.
    assert m["student_kd"]["accuracy"] > m["student_baseline"]["accuracy"]
    _fidelity_improves(m)


def test_class_imbalance_injection(tmp_path):
    m, s, _ = _run("imbalance", tmp_path)
    counts = s["data"]["train_class_counts"]
    assert counts == sorted(counts, reverse=True) and counts[-1] / counts[0] < 0.15
    clean = run_config(CONFIGS / "imbalance.toml", tmp_path / "clean", train__epochs=EPOCHS, data__imbalance=1.0)
    # A long tail costs accuracy on the balanced test split.
    assert m["teacher"]["accuracy"] < clean["models"]["teacher"]["accuracy"]


def test_pruned_student(tmp_path):
    m, _, _ = _run("prune", tmp_path)
    for name in ("student_kd", "student_baseline"):
        assert m[name]["sparsity"] == pytest.approx(0.8, abs=0.01)
    _fidelity_improves(m)


def test_quantization_aware_student(tmp_path):
    m, _, _ = _run("qat", tmp_path)
    for name in ("student_kd", "student_baseline"):
        assert m[name]["quant_levels"] <= 2 ** 4 - 1  # symmetric 4-bit: at most 15 values per layer
    _fidelity_improves(m)


def test_kd_through_the_fused_head_matches_the_logit_path(tmp_path):
    """``fused_head = true`` reads the hidden states entering both heads and never holds the
    logits; it computes the same loss, so the run matches the logit path to rounding."""
    common = dict(train__epochs=3, teacher__count=1)
    m_logits, _, _ = _run("hinton", tmp_path / "logits", **common)
    m_fused, _, lines = _run("hinton", tmp_path / "fused", **common, **{
        "loss.0.fused_head": True, "loss.0.student_head": "head", "loss.0.teacher_head": "head"})
    for key in ("accuracy", "nll", "agreement", "predictive_kl"):
        a, b = m_fused["student_kd"][key], m_logits["student_kd"][key]
        assert abs(a - b) <= 1e-3 * max(abs(b), 1e-3), f"{key}: fused head {a} vs logits {b}"
    assert any(l["model"] == "student_kd" for l in lines)


def test_set_addresses_loss_entries_by_index():
    from fastkd.engine.config import ConfigError, load_config

    cfg = load_config(str(CONFIGS / "hinton.toml"), [("loss.0.temperature", 2.0), ("loss.0.fused_head", True),
                                                     ("loss.0.student_head", "head"), ("loss.0.teacher_head", "head")])
    assert cfg["loss"][0]["temperature"] == 2.0 and cfg["loss"][0]["fused_head"] is True
    with pytest.raises(ConfigError, match=r"loss has 1 entries, '3' is not one of 0..0"):
        load_config(str(CONFIGS / "hinton.toml"), [("loss.3.weight", 1.0)])
    with pytest.raises(ConfigError, match="student_head .* is required with fused_head = true"):
        load_config(str(CONFIGS / "hinton.toml"), [("loss.0.fused_head", True)])
    # A config without [[loss]] tables: the method's default terms are what an index addresses.
    cfg = load_config(None, [("loss.0.weight", 0.5)])
    assert cfg["loss"][0]["weight"] == 0.5
