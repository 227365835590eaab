"""Evaluation reports: report.json for scripts, report.md for people, a confusion-matrix PNG.

Balanced accuracy is always reported beside accuracy, because with imbalanced classes
accuracy alone rewards predicting the majority class.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix,
                             precision_recall_fscore_support, top_k_accuracy_score)

from .core import writing


def compute_report(y_true, proba, label_names: list[str], pred=None, **extra: Any) -> dict:
    """Metrics of probabilities `proba` (N, K) and predicted ids `pred` (default: their argmax)
    against label ids `y_true` (N,)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    proba = np.asarray(proba)
    k = len(label_names)
    if pred is None:
        pred = proba.argmax(axis=1) if len(proba) else np.zeros(0, dtype=np.int64)
    pred = np.asarray(pred, dtype=np.int64)
    labels = np.arange(k)
    rep: dict[str, Any] = {"n": int(len(y_true))}
    if len(y_true):
        rep["accuracy"] = float(accuracy_score(y_true, pred))
        present = np.unique(y_true)
        rep["balanced_accuracy"] = float(balanced_accuracy_score(y_true, pred)) if len(present) > 1 else rep["accuracy"]
        if k > 5:
            rep["top5_accuracy"] = float(top_k_accuracy_score(y_true, proba, k=5, labels=labels))
        p, r, f, s = precision_recall_fscore_support(y_true, pred, labels=labels, zero_division=0)
        rep["per_class"] = {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                            for i, name in enumerate(label_names)}
        rep["confusion_matrix"] = confusion_matrix(y_true, pred, labels=labels).tolist()
    rep["label_names"] = list(label_names)
    rep.update(extra)
    return rep


def write_report(rep: dict, out_dir: str, title: str = "Head report") -> dict[str, str]:
    """Write report.json, report.md and confusion_matrix.png into out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "report.json"), "md": os.path.join(out_dir, "report.md"),
             "png": os.path.join(out_dir, "confusion_matrix.png")}
    with writing(paths["json"]), open(paths["json"], "w") as f:
        json.dump(rep, f, indent=2, default=_jsonable)
    with writing(paths["md"]), open(paths["md"], "w") as f:
        f.write(to_markdown(rep, title))
    if rep.get("confusion_matrix"):
        with writing(paths["png"]):
            plot_confusion(np.array(rep["confusion_matrix"]), rep["label_names"], paths["png"],
                           f"{title}: accuracy {rep.get('accuracy', 0):.3f}, "
                           f"balanced {rep.get('balanced_accuracy', 0):.3f}")
    else:
        paths.pop("png")
    return paths


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def to_markdown(rep: dict, title: str = "Head report") -> str:
    lines = [f"# {title}", ""]
    for key, label in (("head", "Head"), ("layer", "Layer"), ("store", "Store"), ("path", "Training path"),
                       ("n_train", "Training rows"), ("n", "Evaluated rows"),
                       ("training_rows_included", "The head's training rows among them (the figures flatter it)")):
        if key in rep:
            lines.append(f"- {label}: {rep[key]}")
    if rep.get("params"):
        lines.append("- Chosen hyperparameters: " + ", ".join(f"{k}={v}" for k, v in rep["params"].items()))
    lines.append("")
    if "accuracy" in rep:
        lines += ["| metric | value |", "|---|---|", f"| accuracy | {rep['accuracy']:.4f} |",
                  f"| balanced accuracy | {rep['balanced_accuracy']:.4f} |"]
        if "top5_accuracy" in rep:
            lines.append(f"| top-5 accuracy | {rep['top5_accuracy']:.4f} |")
        lines += ["", "## Per class", "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for name, m in rep["per_class"].items():
            lines.append(f"| {name} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |")
        names = rep["label_names"]
        lines += ["", "## Confusion matrix (rows: true, columns: predicted)", "",
                  "| true \\ predicted | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for name, row in zip(names, rep["confusion_matrix"]):
            lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    else:
        lines.append("No labeled rows to evaluate.")
    if rep.get("sweep"):
        lines += ["", f"## Sweep ({rep.get('sweep_scoring', 'accuracy')}, {rep.get('cv', '?')}-fold CV on the training part)",
                  "", "| params | mean | std |", "|---|---|---|"]
        for s in rep["sweep"]:
            ps = ", ".join(f"{k}={v}" for k, v in s["params"].items())
            lines.append(f"| {ps} | {s['mean']:.4f} | {s['std']:.4f} |")
    return "\n".join(lines) + "\n"


def plot_confusion(cm: np.ndarray, names: list[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    k = len(names)
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * k + 2), max(3.5, 0.6 * k + 1.5)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    top = cm.max() if cm.size else 0
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
