"""Pairwise records -> parquet with folds; A/B swap.

A record is ``{id, prompt, response_a, response_b, winner, language}`` from any
:mod:`modelmake.records` source, other field names mapped by ``arena.fields``:

* the pair: ``prompt``, ``response_a``, ``response_b`` as strings (one turn), as lists of strings
  (one per turn; ``null`` items read as ""), or as JSON-encoded such lists (Kaggle LMSYS:
  ``'["Hi", "And then?"]'``); or, as public arena dumps have it, ``conversation_a`` and
  ``conversation_b``, two ``[{role, content}]`` lists with the same user turns. Stored as lists of
  turns (:func:`modelmake.arena.template.pair_turns`), which the template renders turn by turn;
* ``winner`` (labelled pairs): ``model_a`` / ``model_b`` / ``tie`` / ``tie (bothbad)`` (LMSYS),
  ``model_1`` / ``model_2``, ``a`` / ``b`` (any case), or Kaggle's one-hot columns
  ``winner_model_a``, ``winner_model_b``, ``winner_tie`` (0/1). Stored as ``model_a``, ``model_b`` or
  ``tie``; ``ties``: ``drop`` leaves ties out (counted), ``soft`` keeps them, trained on as 0.5/0.5;
* ``id``: a string or an integer, unique over all sources; ``language``: optional ("unknown").

A bad record (missing field, wrong type, unknown winner, turns that do not line up, duplicate id) is
named ``file:line`` (``file:row N``). With ``on_error="fail"`` the first raises :class:`RecordError`
before anything is written; with ``"skip"`` bad records go to a rejects jsonl and are counted
(:class:`modelmake.records.BadRecords`, as reformat does). The stats (``*.stats.json``) count what was
read, written, rejected (by kind), ties and what became of them, winners, languages, turns and
null turns. Folds come from a stable hash of the id, so adding records never moves the others
between folds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from modelmake.arena.template import pair_turns
from modelmake.errors import RecordError
from modelmake.files import provenance_record, stable_hash, write_json, write_parquet
from modelmake.records import BadRecords, missing_field, read_records

PAIR_FIELDS = ("prompt", "response_a", "response_b")
CONVERSATION_FIELDS = ("conversation_a", "conversation_b")
ONE_HOT = {"winner_model_a": "model_a", "winner_model_b": "model_b", "winner_tie": "tie"}
WINNERS = {
    "model_a": "model_a", "a": "model_a", "model_1": "model_a",
    "model_b": "model_b", "b": "model_b", "model_2": "model_b",
    "tie": "tie", "tie (bothbad)": "tie",
}
WINNER_SPELLINGS = "model_a, model_b, tie, tie (bothbad), model_1, model_2, a, b (any case)"
TIES = ("drop", "soft")
UNKNOWN_LANGUAGE = "unknown"


class BadPair(ValueError):
    """A record that is no usable pair; ``kind`` names its class for the stats."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def fold_of(rid: str, folds: int) -> int:
    return stable_hash(rid) % folds


def winner_of(rec: dict, fields: dict, config_key: str = "arena.fields") -> str:
    """``model_a``, ``model_b`` or ``tie`` from ``winner`` or Kaggle's one-hot columns."""
    value = rec.get("winner")
    if value is not None:
        w = WINNERS.get(value.strip().lower()) if isinstance(value, str) else None
        if w is None:
            raise BadPair("unknown winner", f"'winner' must be one of {WINNER_SPELLINGS}, got {value!r}")
        return w
    present = [k for k in ONE_HOT if rec.get(k) is not None]
    if not present:
        raise BadPair("missing field", missing_field("winner", rec, fields, config_key)
                      + f", or give Kaggle's one-hot columns {', '.join(ONE_HOT)}")
    ones = []
    for k in present:
        v = rec[k]
        v = v.strip() if isinstance(v, str) else v
        if v in (1, "1", True, "1.0", "true", "True"):
            ones.append(k)
        elif v not in (0, "0", False, "0.0", "false", "False"):
            raise BadPair("unknown winner", f"{k!r} must be 0 or 1, got {v!r}")
    if len(ones) != 1:
        raise BadPair("unknown winner", f"exactly one of {', '.join(ONE_HOT)} must be 1, got "
                      f"{', '.join(ones) or 'none'}")
    return ONE_HOT[ones[0]]


def conversation_turns(conv_a, conv_b) -> tuple[list, list, list]:
    """(prompts, A's answers, B's answers) of two ``[{role, content}]`` conversations of one battle."""
    out = []
    for name, conv in zip(CONVERSATION_FIELDS, (conv_a, conv_b)):
        if isinstance(conv, str):  # a table's cell: JSON text
            try:
                conv = json.loads(conv)
            except ValueError:
                raise BadPair("wrong type", f"{name!r} must be a list of {{role, content}} messages (or its "
                              "JSON text), got a string that is not JSON") from None
        if not isinstance(conv, (list, tuple)):
            raise BadPair("wrong type", f"{name!r} must be a list of {{role, content}} messages, got "
                          f"{type(conv).__name__}")
        prompts, answers = [], []
        for i, m in enumerate(conv):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise BadPair("wrong type", f"{name!r} item {i} must be an object with 'role' and 'content'")
            role, content = m["role"].lower(), m.get("content")
            if content is not None and not isinstance(content, str):
                raise BadPair("wrong type", f"{name!r} item {i} 'content' must be a string, got {type(content).__name__}")
            if role == "system":
                continue
            if role in ("user", "human"):
                prompts.append(content or "")
                answers.append("")
            elif role in ("assistant", "gpt", "model"):
                if not prompts or answers[-1]:
                    raise BadPair("turns out of order", f"{name!r} item {i}: an assistant turn must follow a user turn")
                answers[-1] = content or ""
            else:
                raise BadPair("unknown role", f"{name!r} item {i}: unknown role {m['role']!r} (user or assistant)")
        if not prompts:
            raise BadPair("empty conversation", f"{name!r} has no user turn")
        out.append((prompts, answers))
    (pa, ra), (pb, rb) = out
    if pa != pb:
        k = next((i for i, (x, y) in enumerate(zip(pa, pb)) if x != y), min(len(pa), len(pb)))
        raise BadPair("turns out of order", f"'conversation_a' and 'conversation_b' differ at user turn {k}; "
                      "a battle's two conversations answer the same prompts")
    return pa, ra, rb


def parse_pair(rec: dict, labelled: bool, fields: dict | None = None) -> dict:
    """The record as a stored row ``{id, prompt, response_a, response_b, language[, winner]}``
    (turn lists); raises BadPair."""
    fields = fields or {}
    rid = rec.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise BadPair("wrong type", f"'id' must be a string or an integer, got {type(rid).__name__}")
    if all(rec.get(k) is not None for k in PAIR_FIELDS):
        try:
            turns = pair_turns(*(rec[k] for k in PAIR_FIELDS))
        except (ValueError, TypeError) as e:
            raise BadPair("wrong type", str(e)) from None
        prompt, a, b = (list(t) for t in zip(*turns))
    elif all(rec.get(k) is not None for k in CONVERSATION_FIELDS):
        prompt, a, b = conversation_turns(*(rec[k] for k in CONVERSATION_FIELDS))
    else:
        missing = next(k for k in PAIR_FIELDS if rec.get(k) is None)
        raise BadPair("missing field", missing_field(missing, rec, fields, "arena.fields")
                      + "; or give the battle as 'conversation_a' and 'conversation_b'")
    language = rec.get("language")
    if language is not None and not isinstance(language, str):
        raise BadPair("wrong type", f"'language' must be a string, got {type(language).__name__}")
    row = {"id": str(rid), "prompt": prompt, "response_a": a, "response_b": b,
           "language": language.strip() if language and language.strip() else UNKNOWN_LANGUAGE}
    if labelled:
        row["winner"] = winner_of(rec, fields)
    return row


def read_pairs(paths: list[str | Path], labelled: bool, fields: dict[str, str] | None = None, *,
               bad: BadRecords | None = None) -> tuple[list[dict], dict]:
    """(rows, counts) of ``paths`` (any :mod:`modelmake.records` source), checked; ``fields``:
    {canonical name: name in the source} (``arena.fields``); ``bad`` collects or raises at bad records
    (default: raise at the first, naming ``arena.on_error``)."""
    bad = bad if bad is not None else BadRecords("fail", "arena.on_error")
    rows, seen = [], {}
    counts = {"read": 0, "null_turns": 0}

    def unreadable(problem) -> None:
        counts["read"] += 1
        bad.unreadable(problem)

    for path in paths:
        for where, rec in read_records(path, fields=fields, required=("id",), config_key="arena.fields",
                                       on_bad=unreadable):
            counts["read"] += 1
            try:
                row = parse_pair(rec, labelled, fields)
                if row["id"] in seen:
                    raise BadPair("duplicate id", f"id {row['id']!r} already used at {seen[row['id']]}; "
                                  "ids must be unique")
            except BadPair as e:
                bad.reject(where, e.kind, str(e), rec)
                continue
            seen[row["id"]] = str(where)
            counts["null_turns"] += sum(_null_turns(rec.get(k)) for k in PAIR_FIELDS)
            rows.append(row)
    return rows, counts


def _null_turns(value) -> int:
    from modelmake.arena.template import json_turns

    if isinstance(value, str):
        value = json_turns(value) or []
    return sum(v is None for v in value) if isinstance(value, (list, tuple)) else 0


def prepare(paths: list[str], out: str | Path, *, labelled: bool, folds: int, config: dict,
            fields: dict[str, str] | None = None, ties: str = "drop", on_error: str = "fail",
            rejects: str | Path | None = None, stats_path: str | Path | None = None) -> dict:
    """Write the pairs of ``paths`` as parquet (with a ``fold`` column when labelled); ties as
    ``ties`` says; bad records as ``on_error`` says (to ``rejects``); counts to ``stats_path``."""
    import pandas as pd
    import pyarrow as pa

    if ties not in TIES:
        raise ValueError(f"ties must be one of {', '.join(TIES)}, got {ties!r}")
    started = time.time()
    bad = BadRecords(on_error, "arena.on_error")
    rows, read = read_pairs(paths, labelled, fields, bad=bad)
    counts = {"read": read["read"], "written": 0, "rejected": bad.rejected, "reasons": bad.reasons}
    if labelled:
        found = sum(r["winner"] == "tie" for r in rows)
        if ties == "drop":
            rows = [r for r in rows if r["winner"] != "tie"]
        counts["ties"] = {"policy": ties, "found": found, "dropped": found if ties == "drop" else 0,
                          "kept": 0 if ties == "drop" else found}
    if not rows:
        raise RecordError(f"no usable pairs in {', '.join(map(str, paths))} (read {read['read']}, rejected "
                          f"{bad.rejected}{', ties dropped' if labelled and ties == 'drop' else ''}). "
                          "Add pairs or fix the config path.")
    if labelled:
        for r in rows:
            r["fold"] = fold_of(r["id"], folds)
    df = pd.DataFrame(rows)
    counts.update(written=len(df), languages=df["language"].value_counts().to_dict(),
                  turns={str(k): int(v) for k, v in df["prompt"].map(len).value_counts().sort_index().items()},
                  null_turns=read["null_turns"])
    if labelled:
        counts["folds"] = {str(k): int(v) for k, v in df["fold"].value_counts().sort_index().items()}
        counts["winner"] = df["winner"].value_counts().to_dict()
    schema = pa.schema([("id", pa.string()), *((k, pa.list_(pa.string())) for k in PAIR_FIELDS),
                        ("language", pa.string()),
                        *([("winner", pa.string()), ("fold", pa.int64())] if labelled else [])])
    prov = provenance_record(config={**config, "ties": ties, "on_error": on_error}, inputs=paths, counts=counts,
                             started=started)
    write_parquet(rows, out, schema=schema, provenance=prov)
    if rejects is not None:
        bad.write(rejects)
    if stats_path is not None:
        write_json(stats_path, {"inputs": [str(p) for p in paths], **counts,
                                "seconds": round(time.time() - started, 3)})
    return counts


def swap(df):
    """The same pairs with A and B exchanged (winner too, a tie stays one; soft targets p_a <-> p_b)."""
    out = df.copy()
    out["response_a"], out["response_b"] = df["response_b"], df["response_a"]
    if "winner" in df:
        out["winner"] = df["winner"].map({"model_a": "model_b", "model_b": "model_a", "tie": "tie"})
    if "p_a" in df and "p_b" in df:
        out["p_a"], out["p_b"] = df["p_b"], df["p_a"]
    elif "p_a" in df:
        out["p_a"] = 1.0 - df["p_a"]
    return out
