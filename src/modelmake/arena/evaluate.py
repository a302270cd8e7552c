"""Held-out metrics (log-loss, accuracy), the two-model ensemble rule, and the report table and plot.

How ties count (labelled pairs kept with ``arena.ties: soft``): the log-loss is the cross-entropy
against the targets, a tie's being 0.5/0.5 (its least possible loss is ln 2, at P(A) = 0.5), over
every pair; the accuracy is over the pairs with a winner, ties left out (no answer is right for them).
``n`` counts every pair, ``ties`` the ties among them. With ``arena.ties: drop`` there are none.
"""

from __future__ import annotations

import math
from pathlib import Path

EPS = 1e-7
TARGETS = {"model_a": 1.0, "model_b": 0.0, "tie": 0.5}
TIES_NOTE = {"log_loss": " (ties as 0.5/0.5)", "accuracy": " (ties left out)"}
HOW_TIES_COUNT = ("log_loss: cross-entropy against the targets over every pair, a tie's target 0.5/0.5 (at least "
                  "ln 2 each); accuracy: over the pairs with a winner, ties left out")


def metrics(p_a, winners) -> dict:
    """Log-loss (ties as 0.5/0.5 targets) and accuracy (ties left out) of P(A wins) against the
    winners (model_a / model_b / tie)."""
    p = [min(1 - EPS, max(EPS, float(x))) for x in p_a]
    y = [TARGETS[w] for w in winners]
    ties = sum(t == 0.5 for t in y)
    if not p:
        return {"log_loss": float("nan"), "accuracy": float("nan"), "n": 0, "ties": 0}
    ll = -sum(t * math.log(q) + (1 - t) * math.log(1 - q) for q, t in zip(p, y)) / len(p)
    decided = [(q, t) for q, t in zip(p, y) if t != 0.5]
    acc = sum((q >= 0.5) == (t == 1.0) for q, t in decided) / len(decided) if decided else float("nan")
    return {"log_loss": round(ll, 6), "accuracy": round(acc, 6), "n": len(p), "ties": ties}


def ensemble(p_first, p_second_swapped, weights: list[float], confident_margin: float) -> list[float]:
    """Confident rows (|pA - pB| >= margin under the first model) keep the first model's answer; the
    rest blend it with the second model's answer on the swapped input (already swapped back)."""
    w1, w2 = weights[0] / sum(weights), weights[1] / sum(weights)
    return [a if abs(2 * a - 1) >= confident_margin else w1 * a + w2 * b
            for a, b in zip(map(float, p_first), map(float, p_second_swapped))]


def write_report(rows: list[dict], tsv: str | Path, png: str | Path, title: str = "arena, held-out fold") -> None:
    """A table (TSV) and a bar plot of log-loss and accuracy per stage, base and the ensemble (ties:
    see the module docstring)."""
    from modelmake.files import atomic_open, pyplot, save_figure

    cols = ["model", "stage", "n", "ties", "log_loss", "accuracy"]
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
        ax.set_title(key.replace("_", "-") + (TIES_NOTE[key] if any(r.get("ties") for r in rows) else ""))
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, png)
