"""Scored prompts -> validated records -> seeded subsample -> train / calib / test parquet.

A record (any :mod:`modelmake.records` source; field names mapped by ``router.fields``) is a
prompt with a label, the scores the weak and the strong model earned on it, or both. The shapes:

* the source document's own training record: ``prompt`` and ``messages`` = [system, user
  ``"[Question]\\n<prompt>\\n\\nPrediction:\\n"``, assistant ``"[[k]]"``]; label only, it trains;
* with the two models' scores beside it: ``"weak_score": 2, "strong_score": 5`` (the demo's shape);
* scores per model name: ``"scores": {"gpt-4-1106-preview": 9, "mixtral-8x7b": 6}``, or one column
  per model (``"mixtral-8x7b": 6``, as RouteLLM-style tables have them); ``router.scores.weak`` and
  ``router.scores.strong`` name the two models, looked up in the ``scores`` object first, then as a
  column. Without ``messages`` the conversation is built from the prompt (see *system* below).

``id`` is optional (a content hash of the prompt is used).

**The label** is what the router learns: the ``[[k]]`` grade an expert judge gives the *weak*
model's answer to the prompt (the source document's meaning; the strong model's score is used only
to evaluate routing). A record's ``[[k]]`` answer is its label; a record without ``messages`` takes
the label from the weak model's score, mapped to 1..5 by ``router.scores.labels`` (:func:`score_label`):

* ``linear`` (default): five equal-width bins over the declared ``router.scores.scale``
  ``{min, max}``, the top one closed: label = min(5, 1 + floor(5 (score - min) / (max - min))).
  MT-Bench 1..10 grades: 1-2 -> 1, 3-4 -> 2, 5-6 -> 3, 7-8 -> 4, 9-10 -> 5; 0/1 correctness: 0 -> 1,
  1 -> 5; 0..1 judge scores: [0, 0.2) -> 1 ... [0.8, 1] -> 5; a 1..5 scale is the identity;
* four cut points ``[c1, c2, c3, c4]``: label 1 below c1, 2 from c1, ..., 5 from c4;
* a table ``{score: label}`` for a discrete scale; a score not in it is an error.

**Scores** are kept on their own scale (``weak_score`` / ``strong_score`` of the splits): routing
quality is their mean. With ``router.scores.scale`` declared, a score outside it is an error with
``file:line``; without, any finite number is taken. true / false count as 1 / 0 (correctness), an
empty CSV cell, null or NaN as no score.

**System instruction**: the router is trained and served with one. Records with ``messages`` carry
it (they must agree); a record without takes ``router.system``, or when that is null the
instruction the other records carry, or when none do the source document's (``tokens.SOURCE_SYSTEM``).

**What each split needs**:

* ``calib``: the reference set the routing threshold is calibrated on (a quantile of the router's
  own scores, so labels only; also the training eval set);
* ``test``: held out for the cost/quality evaluation, which needs both models' scores: it is drawn
  from the records that carry both (the first ``test`` share of the shuffled records after
  ``calib``), so label-only records train and calibrate. Too few such records is an error naming
  the first record without and what to add; ``router.split.test: 0`` trains and calibrates without
  evaluating (an empty test split, no evaluation targets);
* ``train``: the rest.

Every problem is reported with ``file:line`` (``file:row N``) before anything is written.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

from modelmake.config import fill_defaults
from modelmake.errors import RecordError, UserError
from modelmake.files import digest
from modelmake.records import read_records
from modelmake.router.tokens import SOURCE_SYSTEM, conversation, label_of

SPLITS = ("train", "calib", "test")
ROLES = ("system", "user", "assistant")
COLUMNS = ("id", "prompt", "system", "messages", "label", "label_from", "weak_score", "strong_score")
MODELS = ("weak", "strong")


def score_settings(given: dict | None = None) -> dict:
    """``router.scores`` filled with the schema's defaults (weak, strong, scale, labels)."""
    return fill_defaults("router.scores", given or {}, check="router.scores")


def score_label(value: float, scores: dict) -> int:
    """The 1..5 label of a weak-model score under ``router.scores`` (module docstring); raises
    ValueError saying why there is none (a score missing from the table, no scale to bin on)."""
    labels = scores["labels"]
    if isinstance(labels, dict):
        table = {float(k): int(v) for k, v in labels.items()}
        if float(value) not in table:
            raise ValueError(f"the score {value:g} is not in the router.scores.labels table "
                             f"({', '.join(f'{k:g}' for k in sorted(table))}); add it")
        return table[float(value)]
    if isinstance(labels, list):
        return 1 + sum(value >= c for c in labels)
    scale = scores.get("scale")
    if not scale:
        raise ValueError("the label would come from the weak model's score, but router.scores.scale is not "
                         "declared: give it (e.g. {min: 1, max: 10} for MT-Bench grades, {min: 0, max: 1} for "
                         "correctness) or a router.scores.labels table")
    lo, hi = float(scale["min"]), float(scale["max"])
    return min(5, 1 + math.floor(5 * (value - lo) / (hi - lo)))


def _number(v: Any) -> Any:
    """A score as a float, None for none (null, NaN, an empty CSV cell); true / false are 1 / 0; a
    number written as text (CSV) is that number. Anything else comes back as it is (an error)."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, str):
        t = v.strip()
        if not t:
            return None
        if t.lower() in ("true", "false"):
            return float(t.lower() == "true")
        try:
            v = float(t)
        except ValueError:
            return v
    if isinstance(v, (int, float)):
        return None if math.isnan(v) else float(v)
    return v


def _model_score(obj: dict, role: str, model: str | None) -> tuple[str, Any, str | None]:
    """(what, raw value, why missing) of the weak or the strong model's score in a record."""
    if model is None:
        key = f"{role}_score"
        return f'"{key}"', obj.get(key), None if key in obj else f"no {key}"
    table = obj.get("scores")
    if isinstance(table, str) and table.strip().startswith("{"):  # a CSV cell holding the object
        try:
            table = json.loads(table)
        except json.JSONDecodeError:
            pass
    if isinstance(table, dict) and model in table:
        return f'"scores"[{model!r}]', table[model], None
    if model in obj:
        return f'"{model}"', obj[model], None
    has = f"its scores name {', '.join(map(repr, table))}" if isinstance(table, dict) else "no scores object"
    return f"the {role} model {model!r}", None, (f"no score of router.scores.{role} {model!r} ({has} and no "
                                                  f"column {model!r})")


def _scores(where: str, obj: dict, s: dict) -> tuple[dict, str | None]:
    """{weak_score, strong_score} of a record (floats or None) and why one is missing (None: both there)."""
    out, why = {}, None
    scale = s.get("scale")
    for role in MODELS:
        what, raw, missing = _model_score(obj, role, s[role])
        v = _number(raw)
        if v is not None and (not isinstance(v, float) or not math.isfinite(v)):
            raise RecordError(f"bad record in {where}: {what} must be a number, got {raw!r}")
        if v is not None and scale and not scale["min"] <= v <= scale["max"]:
            raise RecordError(
                f"bad record in {where}: {what} is {v:g}, outside the declared router.scores.scale "
                f"[{scale['min']:g}, {scale['max']:g}]; fix the record or declare the scale its scores are on"
            )
        out[f"{role}_score"] = v
        if v is None and why is None:
            why = missing or f"{what} is empty"
    return out, why


def _check_messages(where: str, msgs: Any) -> tuple[str, list[dict], int]:
    """(system instruction, messages, label) of a record's ``messages``."""
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
    return msgs[0]["content"], [{"role": m["role"], "content": m["content"]} for m in msgs], label


def _check(where: str, obj: dict, s: dict) -> dict:
    """One record, validated: id, prompt, system and messages (None when the record has none yet),
    label, label_from, weak_score, strong_score; ``where`` and ``missing`` (why a score is missing)."""
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RecordError(f"bad record in {where}: \"prompt\" must be a non-empty string")
    scores, missing = _scores(where, obj, s)
    msgs = obj.get("messages")
    if msgs is not None:
        system, messages, label = _check_messages(where, msgs)
        label_from = "messages"
    elif scores["weak_score"] is None:
        raise RecordError(
            f"bad record in {where}: no label: no \"messages\" ending in the [[k]] answer and no weak model "
            f"score to take it from ({missing}); add one (router.fields / router.scores.weak name other fields)"
        )
    else:
        try:
            label = score_label(scores["weak_score"], s)
        except ValueError as e:
            raise RecordError(f"bad record in {where}: {e}") from None
        system, messages, label_from = None, None, "weak_score"
    return {"id": str(obj.get("id") or digest(prompt)), "prompt": prompt, "system": system, "messages": messages,
            "label": label, "label_from": label_from, **scores, "where": str(where), "missing": missing}


def read_scored(paths: list[str | Path], fields: dict[str, str] | None = None, scores: dict | None = None,
                system: str | None = None) -> list[dict]:
    """Every record of the given sources (any :mod:`modelmake.records` source), validated, each with
    its conversation; raises RecordError with file:line. ``fields``: {canonical name: name in the
    source} (``router.fields``); ``scores``: ``router.scores``; ``system``: ``router.system``."""
    s = score_settings(scores)
    records, seen = [], {}
    for p in paths:
        for where, obj in read_records(p, fields=fields, required=("prompt",), config_key="router.fields"):
            rec = _check(where, obj, s)
            if rec["id"] in seen:
                raise RecordError(f"bad record in {where}: duplicate id {rec['id']!r} (first at {seen[rec['id']]})")
            seen[rec["id"]] = where
            records.append(rec)
    if not records:
        raise RecordError(f"no records in {', '.join(map(str, paths))}")
    carried: dict[str, str] = {}  # instruction -> the first record carrying it
    for r in records:
        if r["system"] is not None:
            carried.setdefault(r["system"], r["where"])
    built = [r for r in records if r["system"] is None]
    if built:
        own = system if system is not None else next(iter(carried), SOURCE_SYSTEM)
        for r in built:
            r["system"], r["messages"] = own, conversation(r["prompt"], own, r["label"])
    systems = {r["system"] for r in records}
    if len(systems) != 1:
        firsts = ", ".join(f"{w} {t[:40]!r}" for t, w in carried.items())
        extra = (f"; the records without messages take router.system {system[:40]!r}" if built and system is not None
                 else "")
        raise RecordError(
            f"{len(systems)} different system instructions in {', '.join(map(str, paths))} (first at {firsts}{extra}); "
            "the router is trained and served with one instruction: make them equal"
        )
    return records


def has_scores(rec: dict) -> bool:
    return rec["weak_score"] is not None and rec["strong_score"] is not None


def split_records(records: list[dict], n_sample: int | None, calib: float, test: float, seed: int) -> dict:
    """A seeded subsample of ``n_sample`` records (all when None), shuffled and cut into splits:
    calib first, then test from the records with both scores, train the rest (module docstring)."""
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
    rest = chosen[n_calib:]
    scored = [r for r in rest if has_scores(r)]
    if len(scored) < n_test:
        first = next((r for r in rest if not has_scores(r)), None)
        raise UserError(
            f"router.split.test: the test split needs {n_test} records with both the weak and the strong model's "
            f"score to evaluate routing on, and only {len(scored)} of the {len(rest)} records left after calib have "
            f"them (the first without: {first['where']}: {first['missing']}). Add the scores: weak_score and "
            "strong_score (router.fields names other fields), or a scores object or a column per model with "
            "router.scores.weak / strong naming the two models; or lower router.split.test, or set it to 0 to "
            "train and calibrate without evaluating routing"
        )
    test_ids = {r["id"] for r in scored[:n_test]}
    out = {"calib": chosen[:n_calib], "test": scored[:n_test], "train": [r for r in rest if r["id"] not in test_ids]}
    for name in SPLITS:
        if not out[name] and not (name == "test" and test == 0):
            raise UserError(f"router.split: the {name} split is empty ({len(chosen)} records); change the fractions")
    return out


def write_splits(paths: list[str | Path], out: dict[str, str | Path], stats_path: str | Path, *,
                 n_sample: int | None, calib: float, test: float, seed: int, config: dict,
                 fields: dict[str, str] | None = None, scores: dict | None = None,
                 system: str | None = None) -> dict:
    """Read, validate, subsample and split; write one parquet per split (provenance in its metadata;
    an empty test split with ``test`` 0) and a stats JSON (counts, label histogram, where the labels
    came from, mean scores per split)."""
    import pandas as pd

    from modelmake.files import provenance_record, write_json, write_parquet

    started = time.time()
    splits = split_records(read_scored(paths, fields, scores, system), n_sample, calib, test, seed)
    stats: dict[str, Any] = {}
    for name, recs in splits.items():
        df = pd.DataFrame(recs, columns=list(COLUMNS)).astype({"weak_score": float, "strong_score": float})
        stats[name] = {
            "records": len(df),
            "labels": {str(k): int(v) for k, v in sorted(df["label"].value_counts().items())},
            "labels_from": {str(k): int(v) for k, v in sorted(df["label_from"].value_counts().items())},
            "with_both_scores": int((df["weak_score"].notna() & df["strong_score"].notna()).sum()),
            "weak_score_mean": None if df["weak_score"].isna().any() or df.empty else float(df["weak_score"].mean()),
            "strong_score_mean": (None if df["strong_score"].isna().any() or df.empty
                                  else float(df["strong_score"].mean())),
        }
        prov = provenance_record(config=config, inputs=paths, counts=stats[name], started=started)
        write_parquet(df, out[name], provenance={**prov, "split": name})
    write_json(stats_path, stats)
    return stats
