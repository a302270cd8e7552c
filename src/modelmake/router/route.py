"""Routing: send a prompt to the strong model when P(weak model is good enough) is below a threshold.

The threshold is calibrated on a reference prompt set, not guessed: for a target share ``s`` of
strong-model calls it is the ``s``-quantile of the reference prompts' ``p_weak_ok``, so about ``s``
of prompts like the reference ones fall below it. ``Router(model_dir, calibration).route(prompts)``
returns ``"strong"`` or ``"weak"`` per prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from modelmake.config import default
from modelmake.errors import UserError
from modelmake.files import read_json

STRONG, WEAK = "strong", "weak"


def calibrate_threshold(reference_scores: Iterable[float], strong_share: float) -> float:
    """The threshold t such that a share ``strong_share`` of the reference scores is below t.

    Prompts with ``p_weak_ok < t`` go to the strong model. 0 sends nothing to it, 1 everything.
    """
    import numpy as np

    ref = np.sort(np.asarray(list(reference_scores), dtype=float))
    if not 0.0 <= strong_share <= 1.0:
        raise UserError(f"router.route.strong_share: {strong_share} is not between 0 and 1")
    if ref.size == 0:
        raise UserError("no reference scores to calibrate the routing threshold on")
    if strong_share <= 0.0:
        return float("-inf")
    if strong_share >= 1.0:
        return float("inf")
    k = int(round(strong_share * ref.size))  # route the k lowest-scoring reference prompts
    if k == 0:
        return float(ref[0])
    if k >= ref.size:
        return float(np.nextafter(ref[-1], np.inf))
    return float((ref[k - 1] + ref[k]) / 2)


def decide(p_weak_ok: Iterable[float], threshold: float) -> list[str]:
    return [STRONG if p < threshold else WEAK for p in p_weak_ok]


def calibration_record(reference_scores: list[float], strong_shares: list[float], reference: str) -> dict:
    """The calibration file: a threshold per target strong share, and the share each gives on the reference."""
    import numpy as np

    ref = np.asarray(reference_scores, dtype=float)
    rows = []
    for s in strong_shares:
        t = calibrate_threshold(ref, s)
        rows.append({"strong_share": s, "threshold": t, "reference_strong_share": float((ref < t).mean())})
    return {"score": "p_weak_ok", "rule": "strong if p_weak_ok < threshold", "reference": reference,
            "reference_prompts": int(ref.size), "thresholds": rows}


class Router:
    """route(prompts) -> ["strong" | "weak"], with a threshold from a calibration file."""

    def __init__(self, model_dir: str | Path, calibration: str | Path | None = None, *,
                 strong_share: float | None = None, threshold: float | None = None,
                 batch_size: int = default("router.score.batch_size")):
        from modelmake.router.score import RouterModel

        if threshold is None:
            if calibration is None:
                raise UserError("give a threshold or a calibration file (router/<run>/route/calibration.json)")
            cal = read_json(calibration)
            rows = cal["thresholds"]
            if strong_share is None:
                if len(rows) != 1:
                    raise UserError(f"{calibration} holds thresholds for strong shares "
                                    f"{[r['strong_share'] for r in rows]}: pick one (--strong-share)")
                row = rows[0]
            else:
                row = next((r for r in rows if abs(r["strong_share"] - strong_share) < 1e-9), None)
                if row is None:
                    raise UserError(f"{calibration} has no threshold for strong share {strong_share}; it has "
                                    f"{[r['strong_share'] for r in rows]} (add it to router.route.strong_shares)")
            threshold = row["threshold"]
        self.threshold = float(threshold)
        self.model = RouterModel(model_dir)
        self.batch_size = batch_size

    def scores(self, prompts: list[str]):
        from modelmake.router.score import score_prompts

        return score_prompts(self.model, prompts, batch_size=self.batch_size)

    def route(self, prompts: list[str]) -> list[str]:
        return decide(self.scores(prompts)["p_weak_ok"], self.threshold)
