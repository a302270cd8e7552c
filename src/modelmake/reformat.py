"""Reformat raw chat records into ``{id, messages: [{role, content}]}`` parquet.

Reads every source :func:`modelmake.records.read_records` reads (JSON lines, plain or compressed, a
JSON array, parquet, CSV, a ``datasets`` folder, a hub id), record by record, in either shape the
original pseudo-label script reads (and the already reformatted one):

* UltraChat raw:  ``{"id", "data": [user, assistant, user, ...]}``
* ShareGPT-like:  ``{"id", "conversations": [{"from": "human"|"gpt"|..., "value"}]}``
* messages:       ``{"id", "messages": [{"role", "content"}]}``

A source's own names for ``id``, ``data``, ``conversations`` or ``messages`` are mapped by
``fields`` (``datasets.<name>.fields``). Every malformed record (bad JSON, invalid UTF-8, missing
field, empty conversation, wrong types, unknown role, turns out of order, duplicate id) is reported
with ``file:line`` (``file:row N`` for tables). With ``on_error="fail"`` the first one raises
:class:`RecordError` before anything is written; with ``on_error="skip"`` bad records go to a
rejects jsonl (``file``, ``line`` or ``row``, ``kind``, ``error``, ``raw``) and are counted. The parquet's schema
metadata holds its provenance (``on_error``, the raw files' hashes, the counts).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from modelmake.errors import RecordError
from modelmake.files import atomic_open, digest, dumps, provenance_record, write_json, write_parquet
from modelmake.records import read_records

ROLE_ALIASES = {
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant",
    "system": "system",
}


class BadRecord(ValueError):
    """A line that cannot be reformatted; the message says why, ``kind`` names its class.

    The classes (counted under ``reasons`` in the stats): bad JSON, invalid UTF-8, missing field,
    empty conversation, wrong type, unknown role, turns out of order, duplicate id.
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def content_id(messages: list[dict]) -> str:
    """A stable id for a record that has none: a hash of its canonical messages."""
    canon = json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return "h-" + digest(canon)


def _check_utf8(value: str, where: str) -> str:
    """JSON escapes can spell lone surrogates (``"\\ud800"``), which no UTF-8 file can hold."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRecord("invalid UTF-8", f"invalid UTF-8: {where} has a lone surrogate escape at "
                        f"character {e.start}") from None
    return value


def _turn_text(value, where: str) -> str:
    if not isinstance(value, str):
        raise BadRecord("wrong type", f"{where} must be a string, got {type(value).__name__}")
    return _check_utf8(value, where)


def parse_messages(record) -> list[dict]:
    """The record's conversation as ``[{role, content}]``; raises BadRecord when malformed."""
    if not isinstance(record, dict):
        raise BadRecord("wrong type", f"a record must be a JSON object, got {type(record).__name__}")
    present = [k for k in ("data", "conversations", "messages") if record.get(k) is not None]  # a table's null: absent
    if present and present[0] == "data":
        turns = record["data"]
        if not isinstance(turns, list):
            raise BadRecord("wrong type", f'"data" must be a list of strings, got {type(turns).__name__}')
        messages = [
            {"role": "user" if i % 2 == 0 else "assistant",
             "content": _turn_text(t, f'"data" item at position {i}')}
            for i, t in enumerate(turns)
        ]
    elif present:
        key, role_key, text_key = (
            ("conversations", "from", "value") if present[0] == "conversations"
            else ("messages", "role", "content")
        )
        turns = record[key]
        if not isinstance(turns, list):
            raise BadRecord("wrong type", f'"{key}" must be a list of objects, got {type(turns).__name__}')
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
                raise BadRecord(
                    "wrong type" if not isinstance(turn, dict) else "missing field",
                    f'"{key}" item at position {i} must be an object with "{role_key}" and "{text_key}"'
                )
            role = turn[role_key]
            if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
                raise BadRecord(
                    "unknown role", f'unknown role {role!r} at position {i}; known: {", ".join(sorted(ROLE_ALIASES))}'
                )
            messages.append({
                "role": ROLE_ALIASES[role.lower()],
                "content": _turn_text(turn[text_key], f'"{key}" item {i} "{text_key}"'),
            })
    else:
        raise BadRecord("missing field", 'missing field: expected "data", "conversations" or "messages"')

    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise BadRecord("empty conversation", "empty conversation: no user or assistant turns")
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise BadRecord("turns out of order", f"turn {i} is {m['role']!r}, expected {expected!r} (turns must alternate, user first)")
    return messages


@dataclass
class ReformatStats:
    read: int = 0
    written: int = 0
    rejected: int = 0
    reasons: dict = field(default_factory=dict)


def reformat_files(
    inputs: list[str | Path],
    out: str | Path,
    *,
    on_error: str = "fail",
    rejects: str | Path | None = None,
    stats_path: str | Path | None = None,
    fields: dict[str, str] | None = None,
) -> ReformatStats:
    """Reformat raw chat sources (any :mod:`modelmake.records` source) into one parquet file; see the
    module docstring for the rules. ``fields``: {canonical name (id, data, conversations, messages):
    name in the source} (``datasets.<name>.fields``)."""
    import pyarrow as pa

    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    started = time.time()
    stats = ReformatStats()
    ids, rows, bad = {}, [], []

    def reject(where, kind: str, error: str, raw: str | None) -> None:
        if on_error == "fail":
            raise RecordError(
                f"bad record in {where}: {error}.\nFix the {'line' if where.line is not None else 'record'} "
                f"or set reformat.on_error: skip to move bad records to a rejects file."
            ) from None
        stats.reasons[kind] = stats.reasons.get(kind, 0) + 1
        stats.rejected += 1
        place = {"line": where.line} if where.line is not None else {"row": where.row}
        bad.append({"file": where.file, **place, "kind": kind, "error": error, "raw": raw})

    def unreadable(problem) -> None:
        stats.read += 1
        reject(problem.where, problem.kind, problem.reason, problem.where.raw)

    for source in inputs:
        for where, record in read_records(source, fields=fields, on_bad=unreadable):
            stats.read += 1
            try:
                messages = parse_messages(record)
                rid = record.get("id")
                if rid is None:
                    rid = content_id(messages)
                elif not isinstance(rid, (str, int)) or isinstance(rid, bool):
                    raise BadRecord("wrong type", f'"id" must be a string or integer, got {type(rid).__name__}')
                rid = _check_utf8(str(rid), '"id"')
                if rid in ids:
                    raise BadRecord("duplicate id", f"duplicate id {rid!r} (first seen at {ids[rid]})")
            except BadRecord as e:
                raw = where.raw if where.raw is not None else json.dumps(record, ensure_ascii=False, default=str)
                reject(where, e.kind, str(e), raw)
                continue
            ids[rid] = str(where)  # the place, without the line it holds
            rows.append({"id": rid, "messages": messages})

    stats.written = len(rows)
    schema = pa.schema([
        ("id", pa.string()),
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ])
    counts = {"read": stats.read, "written": stats.written, "rejected": stats.rejected,
              "reasons": stats.reasons}
    write_parquet(rows, out, schema=schema, provenance=provenance_record(
        config={"on_error": on_error}, inputs=inputs, counts=counts, started=started))
    if rejects is not None:
        with atomic_open(rejects) as f:
            for row in bad:
                f.write(dumps(row) + "\n")
    if stats_path is not None:
        write_json(stats_path, {"inputs": [str(p) for p in inputs], **counts,
                                "seconds": round(time.time() - started, 3)})
    return stats
