"""The engine's feature term on the fused feature ops: every metric the config accepts, what each
computes, short runs with a hint and with attention transfer, and the errors (one line)."""

import json

import pytest
import torch
import torch.nn.functional as F

import fastkd
from engine_helpers import run_config
from fastkd.engine.config import ConfigError, load_config
from fastkd.engine.losses import FEATURE_METRICS, RELATIONAL_METRICS, feature_distance, relational_loss_fn
from feature_helpers import make_features, make_maps


def _feature_config(tmp_path, metric, extra="", arch="mlp"):
    models = (
        '[teacher]\ncount = 1\nhidden = [64, 64]\n[student]\nhidden = [32, 32]\n'
        if arch == "mlp"
        else '[teacher]\ncount = 1\narch = "cnn"\nchannels = [8, 16]\n[student]\narch = "cnn"\nchannels = [4, 8]\n'
    )
    p = tmp_path / f"{metric}.toml"
    p.write_text(
        f'{models}[[loss]]\nkind = "kd"\n[[loss]]\nkind = "feature"\nstudent = "blocks.0"\nteacher = "blocks.0"\n'
        f'metric = "{metric}"\nweight = 2.0\n{extra}'
    )
    return p


def test_every_metric_is_accepted_by_the_config(tmp_path):
    for metric in FEATURE_METRICS:
        cfg = load_config(str(_feature_config(tmp_path, metric)))
        assert cfg["loss"][1]["metric"] == metric and cfg["loss"][1]["p"] == 2.0


@pytest.mark.parametrize(
    "metric,extra,fragment",
    [
        ("huber", "", "loss[1].metric must be one of 'mse', 'l1', 'smooth_l1', 'cosine', 'normalized_mse', 'at', 'rkd_distance', 'rkd_angle', 'sp', 'pkt', got 'huber'"),
        ("mse", "p = 3.0\n", "loss[1].p is the exponent of metric 'at'; it does not apply to metric 'mse'"),
        ("at", "p = 0.5\n", "loss[1].p must be >= 1.0, got 0.5"),
    ],
)
def test_bad_metric_options_are_one_line_config_errors(tmp_path, capsys, metric, extra, fragment):
    path = _feature_config(tmp_path, metric, extra)
    with pytest.raises(ConfigError, match=None) as e:
        load_config(str(path))
    assert fragment in str(e.value)
    from fastkd.cli import main

    assert main(["distill", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and fragment in err and not (tmp_path / "r").exists()


@pytest.mark.parametrize("missing", RELATIONAL_METRICS)
def test_a_relational_metric_fastkd_lacks_stops_the_job_at_start(tmp_path, capsys, monkeypatch, missing):
    # Every relational op has landed: a fastkd without one is made by taking it away.
    monkeypatch.delattr(fastkd, f"{missing}_loss")
    assert relational_loss_fn(missing) is None
    from fastkd.cli import main

    path = _feature_config(tmp_path, missing)
    assert main(["distill", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"loss[1].metric '{missing}' needs fastkd.{missing}_loss" in err
    assert not (tmp_path / "r").exists()


def test_feature_distance_is_the_fused_op_of_each_metric():
    s, t = make_features((6, 5, 4))
    fs, ft = s.flatten(1), t.flatten(1)
    expected = {
        "mse": F.mse_loss(fs, ft),
        "l1": F.l1_loss(fs, ft),
        "smooth_l1": F.smooth_l1_loss(fs, ft),
        "cosine": (1 - F.cosine_similarity(fs, ft, dim=1)).mean(),
        "normalized_mse": F.mse_loss(F.normalize(fs, dim=1), F.normalize(ft, dim=1)),
    }
    for metric, value in expected.items():
        torch.testing.assert_close(feature_distance(s, t, metric), value, rtol=1e-5, atol=1e-7)
    ms, mt = make_maps((3, 4, 5, 5), 7)
    for p in (2.0, 3.0):
        torch.testing.assert_close(feature_distance(ms, mt, "at", p), fastkd.attention_transfer_loss_reference(ms, mt, p=p))
    for metric in RELATIONAL_METRICS:
        if relational_loss_fn(metric) is None:
            with pytest.raises(RuntimeError, match=f"needs fastkd.{metric}_loss"):
                feature_distance(fs, ft[:, :7], metric)
        else:
            torch.testing.assert_close(feature_distance(fs, ft[:, :7], metric), relational_loss_fn(metric)(fs, ft[:, :7]))


def _val_terms(out):
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [l["terms"] for l in lines if l["model"] == "student_kd" and l["split"] == "val"]


def test_engine_runs_a_cosine_hint_through_a_regressor(tmp_path):
    out = tmp_path / "run"
    run_config(_feature_config(tmp_path, "cosine"), out, train__epochs=4)
    terms = _val_terms(out)
    assert set(terms[0]) == {"kd0", "feature1"}
    assert terms[-1]["feature1"] < terms[0]["feature1"]


def test_engine_runs_attention_transfer_between_different_channel_counts(tmp_path):
    out = tmp_path / "run"
    run_config(_feature_config(tmp_path, "at", "p = 2.0\n", arch="cnn"), out, train__epochs=3)
    terms = _val_terms(out)
    assert terms[-1]["feature1"] < terms[0]["feature1"]


def test_attention_transfer_on_flat_features_is_a_config_error(tmp_path, capsys):
    from fastkd.cli import main

    assert main(["distill", str(_feature_config(tmp_path, "at")), "--out", str(tmp_path / "r"), "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "loss[1].metric 'at' needs [B, C, H, W] feature maps of equal H, W" in err
