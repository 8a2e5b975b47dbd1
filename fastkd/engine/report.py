"""What a run leaves for people: the metrics log, the printed table and the PNG plot."""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List

COLUMNS = ("accuracy", "nll", "ece", "agreement", "predictive_kl")
# A language model's test metrics are per token; perplexity leads, ECE is not measured.
LM_COLUMNS = ("perplexity", "nll", "accuracy", "agreement", "predictive_kl")


def columns(summary: dict) -> tuple:
    return LM_COLUMNS if summary.get("task") == "lm" else COLUMNS


class MetricsLog:
    """Appends one JSON line per evaluation to ``metrics.jsonl`` (rank 0 only; ``path=None``
    writes nothing). Each line is flushed and fsync'ed, and :meth:`offset` gives the file size
    a checkpoint records, so that a resumed run first cuts off lines written after it."""

    def __init__(self, path, truncate_to: int = None):
        self.path = path
        if path is None:
            return
        if truncate_to is not None and os.path.exists(path):
            with open(path, "r+b") as f:
                f.truncate(truncate_to)
        self._f = open(path, "ab")

    def __call__(self, line: dict) -> None:
        if self.path is None:
            return
        self._f.write((json.dumps(line, sort_keys=True) + "\n").encode())
        self._f.flush()
        os.fsync(self._f.fileno())

    def offset(self) -> int:
        return 0 if self.path is None else self._f.tell()

    def close(self) -> None:
        if self.path is not None:
            self._f.close()


def read_metrics(path: str) -> List[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def table(models: Dict[str, dict], cols: tuple = COLUMNS) -> str:
    """A fixed-width table of the summary's models (``-`` where a metric does not apply)."""
    width = max(len("model"), *(len(n) for n in models))
    head = f"{'model':<{width}}  " + "  ".join(f"{c:>13}" for c in cols)
    rows = [head, "-" * len(head)]
    for name, m in models.items():
        cells = [f"{m[c]:>13.4f}" if c in m else f"{'-':>13}" for c in cols]
        rows.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(rows)


def plot(metrics_path: str, summary: dict, out_path: str) -> None:
    """Learning curves (validation accuracy and training loss per epoch, one line per model and
    phase) above the final test comparison, one panel per metric with its own scale (predictive
    KL and ECE are a hundred times smaller than accuracy and vanish on a shared axis), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = summary["models"]
    lm = summary.get("task") == "lm"
    names = [n for n in ("teacher", "student_baseline", "student_kd") if n in models] or list(models)
    keys = [k for k in columns(summary) if any(k in models[n] for n in names)]
    fig = plt.figure(figsize=(16, 8.2))
    grid = fig.add_gridspec(2, 2 * len(keys), height_ratios=(1.25, 1))
    half = len(keys)
    acc_ax, loss_ax = fig.add_subplot(grid[0, :half]), fig.add_subplot(grid[0, half:])

    curves: Dict[tuple, list] = {}
    for line in read_metrics(metrics_path):
        if line.get("split") == "val":
            curves.setdefault((line["phase"], line["model"]), []).append(line)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (phase, model), pts in curves.items():
        label = model if phase in (model, "students", "teachers", "mutual") else f"{model} ({phase})"
        if lm:
            # How well each model predicts text and how closely each student follows the
            # teacher, per step; a model keeps its colour in every panel, bars included.
            c = colors[next((i for i, n in enumerate(names) if model == n or model.startswith(n + "_")), 3) % len(colors)]
            acc_ax.plot([p["step"] for p in pts], [p["perplexity"] for p in pts], label=label, lw=1.2, marker=".", color=c)
            if "agreement" in pts[0]:
                loss_ax.plot([p["step"] for p in pts], [p["agreement"] for p in pts], label=label, lw=1.2, marker=".", color=c)
        else:
            acc_ax.plot([p["epoch"] for p in pts], [p["accuracy"] for p in pts], label=label, lw=1.2)
            loss_ax.plot([p["epoch"] for p in pts], [p["train_loss"] for p in pts], label=label, lw=1.2)
    if lm:
        acc_ax.set(title="validation perplexity (per token)", xlabel="optimizer step of the phase", ylabel="perplexity", yscale="log")
        loss_ax.set(title="validation top-1 agreement with the teacher", xlabel="optimizer step of the phase", ylabel="agreement")
        loss_ax.legend(fontsize=7)
    else:
        acc_ax.set(title="validation accuracy", xlabel="epoch", ylabel="accuracy")
        loss_ax.set(title="training loss", xlabel="epoch", ylabel="loss", yscale="log")
    acc_ax.legend(fontsize=7, ncol=2)

    better = {"accuracy": "higher", "agreement": "higher", "nll": "lower", "ece": "lower", "predictive_kl": "lower",
              "perplexity": "lower"}
    for j, key in enumerate(keys):
        ax = fig.add_subplot(grid[1, 2 * j : 2 * j + 2])
        shown = [n for n in names if key in models[n]]
        values = [models[n][key] for n in shown]
        bars = ax.bar(range(len(shown)), values, color=[colors[names.index(n) % len(colors)] for n in shown])
        ax.bar_label(bars, [f"{v:.4f}" for v in values], fontsize=7)
        # A diverged model's NaN is labelled, not drawn, and does not set the scale.
        finite = [v for v in values if math.isfinite(v)] or [0.0, 1.0]
        low, high = min(finite), max(finite)
        pad = (high - low) * 0.6 or abs(high) * 0.05 or 1e-3
        # Accuracy-like metrics differ in the third digit: zoom the axis onto the values.
        zoom = key in ("accuracy", "agreement") or (lm and key in ("perplexity", "nll"))
        ax.set_ylim(max(0.0, low - pad) if zoom else 0.0, high + pad)
        ax.set_xticks(range(len(shown)), [n.replace("student_", "") for n in shown], fontsize=8)
        ax.set_title(f"{key} ({better.get(key, '')} is better)", fontsize=9)
    fig.suptitle(f"fastkd distill: {summary['method']} on {summary['data']['name']} (bottom row: test split)")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
