"""Evaluate routing on a held-out set: cost (share of strong-model calls) against quality.

Definitions follow RouteLLM (Ong et al., 2024, and its ``routellm/evals/evaluate.py``):

* a router with threshold ``t`` sends a prompt to the strong model when its score says so; over a
  test set that gives a point (strong-call share ``c``, mean quality ``q`` of the answers served);
* the thresholds are swept across the test scores' quantiles, so ``c`` covers 0..1;
* PGR(c) = (q(c) - q_weak) / (q_strong - q_weak), q_weak / q_strong: quality with every prompt on
  the weak / strong model;
* APGR: the area under the quality curve over c in [0, 1] (trapezoids), less the weak model's
  area, over the strong minus the weak model's area, i.e. the mean PGR over the call share;
* CPT(x%): the smallest strong-call share whose quality recovers x% of the gap: the first
  crossing of q_weak + x (q_strong - q_weak) along the curve, linearly interpolated (RouteLLM
  interpolates with ``np.interp``; on a monotone curve the two agree).

Compared methods: the router (p_weak_ok; also its expected score), a random router (its expected
quality is linear in c: APGR 0.5, CPT(x%) = x%), and the oracle that knows each prompt's gain.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

from modelmake.config import default
from modelmake.errors import UserError
from modelmake.files import pyplot, save_figure, write_json

log = logging.getLogger(__name__)


def curve(scores: Sequence[float], weak: Sequence[float], strong: Sequence[float], points: int) -> list[dict]:
    """Sweep thresholds: strong when score < t, t at ``points`` + 1 quantiles of the scores (0..1).

    Returns [{threshold, strong_share, quality}] sorted by strong_share (distinct shares only).
    """
    import numpy as np

    from modelmake.router.route import calibrate_threshold

    s, w, g = (np.asarray(x, dtype=float) for x in (scores, weak, strong))
    out = {}
    for i in range(points + 1):
        t = calibrate_threshold(s, i / points)
        to_strong = s < t
        share = float(to_strong.mean())
        out.setdefault(share, {"threshold": t, "strong_share": share,
                               "quality": float(np.where(to_strong, g, w).mean())})
    return [out[k] for k in sorted(out)]


def random_curve(weak: Sequence[float], strong: Sequence[float], points: int) -> list[dict]:
    """A random router's expected quality at each share: linear between the two models."""
    qw, qs = float(sum(weak) / len(weak)), float(sum(strong) / len(strong))
    return [{"threshold": None, "strong_share": i / points, "quality": qw + i / points * (qs - qw)}
            for i in range(points + 1)]


def apgr(points: list[dict], q_weak: float, q_strong: float) -> float:
    import numpy as np

    c = np.array([p["strong_share"] for p in points])
    q = np.array([p["quality"] for p in points])
    auc = float(np.trapezoid(q, c))
    span = float(c[-1] - c[0])
    return (auc - q_weak * span) / ((q_strong - q_weak) * span)


def cpt(points: list[dict], q_weak: float, q_strong: float, x: float) -> float | None:
    """Strong-call share needed to recover a share ``x`` of the quality gap; None if never."""
    target = q_weak + x * (q_strong - q_weak)
    prev = None
    for p in points:
        if p["quality"] >= target - 1e-12:
            if prev is None or p["quality"] == prev["quality"]:
                return p["strong_share"]
            f = (target - prev["quality"]) / (p["quality"] - prev["quality"])
            return prev["strong_share"] + f * (p["strong_share"] - prev["strong_share"])
        prev = p
    return None


def summarize(points: list[dict], q_weak: float, q_strong: float) -> dict:
    return {
        "APGR": apgr(points, q_weak, q_strong),
        "CPT(20%)": cpt(points, q_weak, q_strong, 0.2),
        "CPT(50%)": cpt(points, q_weak, q_strong, 0.5),
        "CPT(80%)": cpt(points, q_weak, q_strong, 0.8),
        "curve": points,
    }


def evaluate_scores(df, *, points: int = default("router.evaluate.points"),
                    calibration: dict | None = None, name: str = "the scored test set") -> dict:
    """Metrics of a scored test set (columns p_weak_ok, expected_score, weak_score, strong_score)."""
    import numpy as np

    if df.empty:
        raise UserError(f"{name} has no prompts (router.split.test: 0 makes no test split): nothing to evaluate "
                        "routing on; set router.split.test above 0 with records that carry both models' scores")
    for col in ("p_weak_ok", "weak_score", "strong_score"):
        if col not in df or df[col].isna().any():
            n = len(df) if col not in df else int(df[col].isna().sum())
            fix = ("score it with router-score" if col == "p_weak_ok" else
                   "every test record needs the weak and the strong model's score (weak_score / strong_score, or "
                   "router.scores.weak / strong naming the models); router-data draws the test split from such records")
            raise UserError(f"{name}: {n} of {len(df)} prompts have no {col!r}, which evaluating routing needs; {fix}")
    w, g = df["weak_score"].to_numpy(float), df["strong_score"].to_numpy(float)
    q_weak, q_strong = float(w.mean()), float(g.mean())
    if not q_strong > q_weak:
        raise UserError(
            f"the strong model's mean quality ({q_strong:.3f}) is not above the weak model's ({q_weak:.3f}) on "
            "the test set: there is no gap for routing to recover"
        )
    methods = {
        "router": summarize(curve(df["p_weak_ok"], w, g, points), q_weak, q_strong),
        "random": summarize(random_curve(w, g, points), q_weak, q_strong),
        "optimal": summarize(curve(-(g - w), w, g, points), q_weak, q_strong),
    }
    if "expected_score" in df:
        methods["router_expected_score"] = summarize(curve(df["expected_score"], w, g, points), q_weak, q_strong)
    metrics = {"prompts": len(df), "weak_quality": q_weak, "strong_quality": q_strong, "points": points,
               "methods": methods}
    if "label" in df:
        pred = df[["p1", "p2", "p3", "p4", "p5"]].to_numpy().argmax(axis=1) + 1
        metrics["label_accuracy"] = float((pred == df["label"].to_numpy()).mean())
        metrics["label_majority_accuracy"] = float(df["label"].value_counts(normalize=True).max())
    if calibration is not None:
        rows = []
        p = df["p_weak_ok"].to_numpy(float)
        for r in calibration["thresholds"]:
            to_strong = p < r["threshold"]
            q = float(np.where(to_strong, g, w).mean())
            rows.append({**r, "test_strong_share": float(to_strong.mean()), "test_quality": q,
                         "test_PGR": (q - q_weak) / (q_strong - q_weak)})
        metrics["calibrated"] = rows
    return metrics


def plot(metrics: dict, png: str | Path, title: str = "router: cost vs quality") -> None:
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    styles = {"router": ("C0", "o", "-"), "router_expected_score": ("C2", ".", ":"),
              "random": ("grey", None, "--"), "optimal": ("C1", "x", "-.")}
    for name, m in metrics["methods"].items():
        color, marker, ls = styles.get(name, (None, None, "-"))
        xs = [100 * p["strong_share"] for p in m["curve"]]
        ys = [p["quality"] for p in m["curve"]]
        cpt50 = m["CPT(50%)"]
        label = f"{name}: APGR {m['APGR']:.3f}, CPT(50%) " + ("n/a" if cpt50 is None else f"{100 * cpt50:.1f}%")
        ax.plot(xs, ys, color=color, marker=marker, linestyle=ls, label=label, markersize=4)
    ax.axhline(metrics["weak_quality"], color="black", linewidth=0.8, linestyle=":")
    ax.axhline(metrics["strong_quality"], color="red", linewidth=0.8, linestyle=":")
    for r in metrics.get("calibrated", []):
        ax.scatter([100 * r["test_strong_share"]], [r["test_quality"]], color="C3", zorder=5, s=30)
        ax.annotate(f"target {100 * r['strong_share']:.0f}%", (100 * r["test_strong_share"], r["test_quality"]),
                    textcoords="offset points", xytext=(4, -10), fontsize=7, color="C3")
    ax.set_xlabel("strong model calls (%)")
    ax.set_ylabel("mean quality of served answers")
    ax.set_title(f"{title} ({metrics['prompts']} test prompts)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, png)


def evaluate_file(scored: str | Path, metrics_path: str | Path, png: str | Path, *, points: int,
                  calibration: str | Path | None = None, config: dict | None = None) -> dict:
    import pandas as pd

    from modelmake.files import read_json

    df = pd.read_parquet(scored)
    cal = read_json(calibration) if calibration else None
    metrics = evaluate_scores(df, points=points, calibration=cal, name=str(scored))
    metrics["config"] = config or {}
    write_json(metrics_path, _finite(metrics))
    plot(metrics, png)
    r = metrics["methods"]["router"]
    log.info("router APGR %.3f, CPT(50%%) %s, CPT(80%%) %s (random APGR 0.5)", r["APGR"], r["CPT(50%)"], r["CPT(80%)"])
    return metrics


def _finite(obj):
    """JSON has no infinities: thresholds of +-inf (all / nothing to the strong model) become strings."""
    if isinstance(obj, float) and math.isinf(obj):
        return "inf" if obj > 0 else "-inf"
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
