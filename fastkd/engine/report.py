"""What a run leaves for people: the metrics log, the printed table and the PNG plot."""

from __future__ import annotations

import json
import os
from typing import Dict, List

COLUMNS = ("accuracy", "nll", "ece", "agreement", "predictive_kl")


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


def table(models: Dict[str, dict]) -> str:
    """A fixed-width table of the summary's models (``-`` where a metric does not apply)."""
    width = max(len("model"), *(len(n) for n in models))
    head = f"{'model':<{width}}  " + "  ".join(f"{c:>13}" for c in COLUMNS)
    rows = [head, "-" * len(head)]
    for name, m in models.items():
        cells = [f"{m[c]:>13.4f}" if c in m else f"{'-':>13}" for c in COLUMNS]
        rows.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(rows)


def plot(metrics_path: str, summary: dict, out_path: str) -> None:
    """Learning curves (validation accuracy and training loss per epoch, one line per model
    and phase) and the final test comparison (accuracy, agreement, predictive KL) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [l for l in read_metrics(metrics_path) if l.get("split") == "val"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    curves: Dict[tuple, list] = {}
    for l in lines:
        curves.setdefault((l["phase"], l["model"]), []).append(l)
    for (phase, model), pts in curves.items():
        label = model if phase in (model, "students", "teachers", "mutual") else f"{model} ({phase})"
        axes[0].plot([p["epoch"] for p in pts], [p["accuracy"] for p in pts], label=label, lw=1.2)
        axes[1].plot([p["epoch"] for p in pts], [p["train_loss"] for p in pts], label=label, lw=1.2)
    axes[0].set(title="validation accuracy", xlabel="epoch", ylabel="accuracy")
    axes[1].set(title="training loss", xlabel="epoch", ylabel="loss", yscale="log")
    axes[0].legend(fontsize=7, ncol=2)
    models = summary["models"]
    names = [n for n in ("teacher", "student_baseline", "student_kd") if n in models] or list(models)
    keys = [k for k in ("accuracy", "agreement", "predictive_kl", "nll", "ece") if any(k in models[n] for n in names)]
    width = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        xs = [j + i * width for j in range(len(keys))]
        axes[2].bar(xs, [models[n].get(k, 0.0) for k in keys], width, label=n)
    axes[2].set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(keys))], keys, fontsize=8)
    axes[2].set(title="test split (final)")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"fastkd distill: {summary['method']} on {summary['data']['name']}")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
