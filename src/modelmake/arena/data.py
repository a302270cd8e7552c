"""Pairwise records -> parquet with folds; A/B swap.

A record is ``{id, prompt, response_a, response_b, winner, language}`` (``winner`` in
``model_a``/``model_b``; unlabelled records have none), from any :mod:`modelmake.records` source,
other field names mapped by ``arena.fields``. Bad records are reported with file:line (file:row N).
Folds come from a stable hash of the id, so adding records never moves the others between folds.
"""

from __future__ import annotations

import time
from pathlib import Path

from modelmake.errors import RecordError
from modelmake.files import provenance_record, stable_hash, write_parquet
from modelmake.records import read_records

TEXT_FIELDS = ("id", "prompt", "response_a", "response_b", "language")
WINNERS = ("model_a", "model_b")


def fold_of(rid: str, folds: int) -> int:
    return stable_hash(rid) % folds


def read_pairs(paths: list[str | Path], labelled: bool, fields: dict[str, str] | None = None) -> list[dict]:
    """The pairs of ``paths`` (any :mod:`modelmake.records` source), checked; ``fields``: {canonical
    name: name in the source} (``arena.fields``)."""
    rows, seen = [], {}
    required = TEXT_FIELDS + (("winner",) if labelled else ())
    for path in paths:
        for where, rec in read_records(path, fields=fields, required=required, config_key="arena.fields"):
            for k in TEXT_FIELDS:
                if not isinstance(rec.get(k), str):
                    raise RecordError(f"bad record in {where}: {k!r} must be a string, got "
                                      f"{type(rec.get(k)).__name__}. Fix the line.")
            if labelled and rec.get("winner") not in WINNERS:
                raise RecordError(f"bad record in {where}: 'winner' must be one of {', '.join(WINNERS)}, "
                                  f"got {rec.get('winner')!r}. Fix the line or drop it.")
            if rec["id"] in seen:
                raise RecordError(f"bad record in {where}: id {rec['id']!r} already used at "
                                  f"{seen[rec['id']]}. Ids must be unique.")
            seen[rec["id"]] = where
            row = {k: rec[k] for k in TEXT_FIELDS}
            if labelled:
                row["winner"] = rec["winner"]
            rows.append(row)
    return rows


def prepare(paths: list[str], out: str | Path, *, labelled: bool, folds: int, config: dict,
            fields: dict[str, str] | None = None) -> dict:
    """Write the records of ``paths`` as parquet (with a ``fold`` column when labelled)."""
    import pandas as pd

    started = time.time()
    rows = read_pairs(paths, labelled, fields)
    if not rows:
        raise RecordError(f"no records in {', '.join(map(str, paths))}. Add pairs or fix the config path.")
    df = pd.DataFrame(rows)
    if labelled:
        df["fold"] = [fold_of(r, folds) for r in df["id"]]
    counts = {"rows": len(df), "languages": df["language"].value_counts().to_dict()}
    if labelled:
        counts["folds"] = {str(k): v for k, v in df["fold"].value_counts().sort_index().items()}
        counts["winner"] = df["winner"].value_counts().to_dict()
    prov = provenance_record(config=config, inputs=paths, counts=counts, started=started)
    write_parquet(df, out, provenance=prov)
    return counts


def swap(df):
    """The same pairs with A and B exchanged (winner too; soft targets p_a <-> p_b)."""
    out = df.copy()
    out["response_a"], out["response_b"] = df["response_b"], df["response_a"]
    if "winner" in df:
        out["winner"] = df["winner"].map({"model_a": "model_b", "model_b": "model_a"})
    if "p_a" in df and "p_b" in df:
        out["p_a"], out["p_b"] = df["p_b"], df["p_a"]
    elif "p_a" in df:
        out["p_a"] = 1.0 - df["p_a"]
    return out

