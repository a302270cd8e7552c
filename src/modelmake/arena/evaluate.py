"""Held-out metrics (log-loss, accuracy), the two-model ensemble rule, and the report table and plot."""

from __future__ import annotations

import math
from pathlib import Path

EPS = 1e-7


def metrics(p_a, winners) -> dict:
    """Log-loss and accuracy of P(A wins) against the winners (model_a / model_b)."""
    p = [min(1 - EPS, max(EPS, float(x))) for x in p_a]
    y = [w == "model_a" for w in winners]
    if not p:
        return {"log_loss": float("nan"), "accuracy": float("nan"), "n": 0}
    ll = -sum(math.log(q) if t else math.log(1 - q) for q, t in zip(p, y)) / len(p)
    acc = sum((q >= 0.5) == t for q, t in zip(p, y)) / len(p)
    return {"log_loss": round(ll, 6), "accuracy": round(acc, 6), "n": len(p)}


def ensemble(p_first, p_second_swapped, weights: list[float], confident_margin: float) -> list[float]:
    """Confident rows (|pA - pB| >= margin under the first model) keep the first model's answer; the
    rest blend it with the second model's answer on the swapped input (already swapped back)."""
    w1, w2 = weights[0] / sum(weights), weights[1] / sum(weights)
    return [a if abs(2 * a - 1) >= confident_margin else w1 * a + w2 * b
            for a, b in zip(map(float, p_first), map(float, p_second_swapped))]


def write_report(rows: list[dict], tsv: str | Path, png: str | Path, title: str = "arena, held-out fold") -> None:
    """A table (TSV) and a bar plot of log-loss and accuracy per stage, base and the ensemble."""
    from modelmake.files import atomic_open, pyplot, save_figure

    cols = ["model", "stage", "n", "log_loss", "accuracy"]
    with atomic_open(tsv) as f:
        f.write("\t".join(cols) + "\n")
        for r in rows:
            f.write("\t".join(str(r[c]) for c in cols) + "\n")
    labels = [f"{r['stage']}\n{r['model']}" for r in rows]
    fig, axes = pyplot().subplots(1, 2, figsize=(max(6, 1.1 * len(rows) * 2), 3.8))
    for ax, key, ref in ((axes[0], "log_loss", math.log(2)), (axes[1], "accuracy", 0.5)):
        ax.bar(range(len(rows)), [r[key] for r in rows], color=[
            "tab:gray" if r["stage"] == "ensemble" else "tab:blue" for r in rows])
        ax.axhline(ref, color="tab:red", linestyle="--", linewidth=1, label="chance")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(key.replace("_", "-"))
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, png)
