"""The held-out report: every stage of every base, and the ensemble, on the validation fold."""

from __future__ import annotations

from modelmake.arena.evaluate import HOW_TIES_COUNT, metrics, write_report
from modelmake.files import write_json


def report(evals: dict[str, str], ensemble_preds: str, labelled: str, valid_fold: int,
           tsv: str, png: str, json_path: str) -> list[dict]:
    """``evals`` maps ``stage/base`` to an eval parquet (p_a, winner)."""
    import pandas as pd

    rows = []
    for key, path in sorted(evals.items()):
        stage, _, base = key.partition("/")
        df = pd.read_parquet(path)
        rows.append({"model": base, "stage": stage, **metrics(df["p_a"], df["winner"])})
    lab = pd.read_parquet(labelled)
    valid = lab[lab["fold"] == valid_fold].set_index("id")
    ens = pd.read_parquet(ensemble_preds)
    rows.append({"model": "stage3", "stage": "ensemble", **metrics(ens["p_a"], valid.loc[ens["id"], "winner"])})
    write_report(rows, tsv, png)
    write_json(json_path, {"valid_fold": valid_fold, "ties": HOW_TIES_COUNT, "rows": rows})
    return rows
