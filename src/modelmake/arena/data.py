"""Pairwise records -> parquet with folds; A/B swap.

A record is ``{id, prompt, response_a, response_b, winner, language}`` (``winner`` in
``model_a``/``model_b``; unlabelled records have none). Bad lines are reported with file:line.
Folds come from a stable hash of the id, so adding records never moves the others between folds.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from modelmake.errors import RecordError
from modelmake.files import code_version, jsonl_objects, sha256_tree

TEXT_FIELDS = ("id", "prompt", "response_a", "response_b", "language")
WINNERS = ("model_a", "model_b")


def fold_of(rid: str, folds: int) -> int:
    return int.from_bytes(hashlib.sha256(rid.encode()).digest()[:8], "big") % folds


def read_pairs(paths: list[str | Path], labelled: bool) -> list[dict]:
    rows, seen = [], {}
    for path in paths:
        for where, rec in jsonl_objects(path):
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


def prepare(paths: list[str], out: str | Path, *, labelled: bool, folds: int, config: dict) -> dict:
    """Write the records of ``paths`` as parquet (with a ``fold`` column when labelled)."""
    import pandas as pd

    started = time.time()
    rows = read_pairs(paths, labelled)
    if not rows:
        raise RecordError(f"no records in {', '.join(map(str, paths))}. Add pairs or fix the config path.")
    df = pd.DataFrame(rows)
    if labelled:
        df["fold"] = [fold_of(r, folds) for r in df["id"]]
    counts = {"rows": len(df), "languages": df["language"].value_counts().to_dict()}
    if labelled:
        counts["folds"] = {str(k): v for k, v in df["fold"].value_counts().sort_index().items()}
        counts["winner"] = df["winner"].value_counts().to_dict()
    write_parquet(df, out, config=config, inputs=paths, counts=counts, started=started)
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


def write_parquet(df, out: str | Path, *, config=None, inputs=(), counts=None, started=None) -> None:
    """Write ``df`` atomically; with ``config`` the parquet's schema metadata holds its provenance
    (config slice, code version, input hashes, counts, wall time), as the foundation's merge does."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df, preserve_index=False)
    if config is not None:
        record = {"code_version": code_version(), "config": config,
                  "inputs": {str(p): sha256_tree(p) for p in inputs}, "counts": counts or {},
                  "wall_seconds": round(time.time() - started, 3) if started else None}
        meta = dict(table.schema.metadata or {})
        meta[b"modelmake.provenance"] = json.dumps(record, ensure_ascii=False, default=str).encode()
        table = table.replace_schema_metadata(meta)
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(out)


def read_provenance(path: str | Path) -> dict:
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(b"modelmake.provenance", b"{}"))
