"""Scored prompts -> validated records -> seeded subsample -> train / calib / test parquet.

A record of the input (any :mod:`modelmake.records` source; the original recipe's training file plus
the scores routing is evaluated on; other field names mapped by ``router.fields``)::

    {"id": "...", "prompt": "...", "messages": [system, user "[Question]...Prediction:", assistant "[[k]]"],
     "weak_score": 2, "strong_score": 5}

``id`` is optional (a content hash is used), ``weak_score`` / ``strong_score`` are the quality the
weak and the strong model earned on the prompt (any numeric scale, e.g. 1..5 judge scores or 0/1
correctness); they are optional for training but the calib / test splits need them to evaluate
routing. Every problem is reported with ``file:line`` before anything is written.

* ``calib``: the reference set the routing threshold is calibrated on (and the training eval set);
* ``test``: held out, for the cost/quality evaluation;
* ``train``: the rest.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

from modelmake.errors import RecordError, UserError
from modelmake.files import digest
from modelmake.records import read_records
from modelmake.router.tokens import label_of

SPLITS = ("train", "calib", "test")
ROLES = ("system", "user", "assistant")


def _number(v: Any) -> Any:
    """A CSV cell is text: a number written as text is that number, an empty cell none."""
    if isinstance(v, str):
        try:
            return float(v) if v.strip() else None
        except ValueError:
            return v
    return v


def _check(where: str, obj: dict) -> dict:
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RecordError(f"bad record in {where}: \"prompt\" must be a non-empty string")
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or [m.get("role") if isinstance(m, dict) else None for m in msgs] != list(ROLES):
        raise RecordError(
            f"bad record in {where}: \"messages\" must be [system, user, assistant] objects with "
            f"\"role\" and \"content\"; got roles {[m.get('role') if isinstance(m, dict) else m for m in msgs or []]}"
        )
    for i, m in enumerate(msgs):
        if not isinstance(m.get("content"), str):
            raise RecordError(f"bad record in {where}: messages[{i}].content must be a string")
    user = msgs[1]["content"]
    if not (user.lstrip().startswith("[Question]") and user.rstrip().endswith("Prediction:")):
        raise RecordError(
            f"bad record in {where}: the user message must be \"[Question]\\n<prompt>\\n\\nPrediction:\\n\", "
            f"got {user[:60]!r}"
        )
    label = label_of(msgs[2]["content"])
    if label is None:
        raise RecordError(
            f"bad record in {where}: the assistant message must be one of [[1]]..[[5]], got {msgs[2]['content'][:40]!r}"
        )
    rec = {
        "id": str(obj.get("id") or digest(prompt)),
        "prompt": prompt,
        "system": msgs[0]["content"],
        "messages": [{"role": m["role"], "content": m["content"]} for m in msgs],
        "label": label,
    }
    for key in ("weak_score", "strong_score"):
        v = _number(obj.get(key))
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise RecordError(f"bad record in {where}: \"{key}\" must be a number, got {v!r}")
        rec[key] = None if v is None else float(v)
    return rec


def read_scored(paths: list[str | Path], fields: dict[str, str] | None = None) -> list[dict]:
    """Every record of the given sources (any :mod:`modelmake.records` source), validated; raises
    RecordError with file:line. ``fields``: {canonical name: name in the source} (``router.fields``)."""
    records, seen = [], {}
    for p in paths:
        for where, obj in read_records(p, fields=fields, required=("prompt", "messages"), config_key="router.fields"):
            rec = _check(where, obj)
            if rec["id"] in seen:
                raise RecordError(f"bad record in {where}: duplicate id {rec['id']!r} (first at {seen[rec['id']]})")
            seen[rec["id"]] = where
            records.append(rec)
    if not records:
        raise RecordError(f"no records in {', '.join(map(str, paths))}")
    systems = {r["system"] for r in records}
    if len(systems) != 1:
        raise RecordError(
            f"{len(systems)} different system instructions in {', '.join(map(str, paths))}; the router is "
            "trained and served with one instruction: make them equal"
        )
    return records


def split_records(records: list[dict], n_sample: int | None, calib: float, test: float, seed: int) -> dict:
    """A seeded subsample of ``n_sample`` records (all when None), shuffled and cut into splits."""
    if n_sample is not None and n_sample > len(records):
        raise UserError(
            f"router.n_sample: {n_sample} is more than the {len(records)} records in the input; "
            "lower it or set it to null to use them all"
        )
    rng = random.Random(seed)
    chosen = sorted(records, key=lambda r: r["id"])
    rng.shuffle(chosen)
    chosen = chosen[:n_sample] if n_sample is not None else chosen
    n_calib, n_test = round(len(chosen) * calib), round(len(chosen) * test)
    out = {"calib": chosen[:n_calib], "test": chosen[n_calib:n_calib + n_test], "train": chosen[n_calib + n_test:]}
    for name in SPLITS:
        if not out[name]:
            raise UserError(f"router.split: the {name} split is empty ({len(chosen)} records); change the fractions")
    for name in ("calib", "test"):
        missing = sum(r["weak_score"] is None or r["strong_score"] is None for r in out[name])
        if missing:
            raise UserError(
                f"{missing} records of the {name} split have no weak_score / strong_score; routing cannot be "
                "calibrated and evaluated without the quality both models earned on each prompt"
            )
    return out


def write_splits(paths: list[str | Path], out: dict[str, str | Path], stats_path: str | Path, *,
                 n_sample: int | None, calib: float, test: float, seed: int, config: dict,
                 fields: dict[str, str] | None = None) -> dict:
    """Read, validate, subsample and split; write one parquet per split (provenance in its metadata)
    and a stats JSON (counts, label histogram, mean scores per split)."""
    import pandas as pd

    from modelmake.files import provenance_record, write_json, write_parquet

    started = time.time()
    splits = split_records(read_scored(paths, fields), n_sample, calib, test, seed)
    stats: dict[str, Any] = {}
    for name, recs in splits.items():
        df = pd.DataFrame(recs)
        stats[name] = {
            "records": len(df),
            "labels": {str(k): int(v) for k, v in sorted(df["label"].value_counts().items())},
            "weak_score_mean": None if df["weak_score"].isna().any() else float(df["weak_score"].mean()),
            "strong_score_mean": None if df["strong_score"].isna().any() else float(df["strong_score"].mean()),
        }
        prov = provenance_record(config=config, inputs=paths, counts=stats[name], started=started)
        write_parquet(df, out[name], provenance={**prov, "split": name})
    write_json(stats_path, stats)
    return stats
