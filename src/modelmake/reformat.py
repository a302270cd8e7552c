"""Reformat raw chat records into the canonical ``{id, messages}`` parquet (:mod:`modelmake.chat`).

Reads every source :func:`modelmake.records.read_records` reads (JSON lines, plain or compressed, a
JSON array, parquet, CSV, a ``datasets`` folder, a hub id), record by record, in any of these shapes
(and the already reformatted one):

* UltraChat raw:  ``{"id", "data": [user, assistant, user, ...]}``
* ShareGPT-like:  ``{"id", "conversations": [{"from": "human"|"gpt"|..., "value"}]}``, with the
  tool turns of glaive / ToolBench / LLaMA-Factory data: ``function_call`` (the value: a JSON
  ``{"name", "arguments"}`` or a list of them) and ``observation`` (the tool's output);
* messages (OpenAI): ``{"id", "messages": [{"role", "content"}]}``, with ``tool`` (and legacy
  ``function``) messages, assistant messages with ``tool_calls`` (or a legacy ``function_call``)
  whose content may be null or absent;

and an optional top-level ``system`` field (ShareGPT / LLaMA-Factory), which becomes the first
message (an empty one is ignored). Messages keep their ``name``. Roles map to the canonical four
(:data:`ROLE_ALIASES`): a ``function_call`` turn becomes an assistant turn carrying the call;
``observation``, ``tool`` and ``function`` become ``tool`` messages. Calls without an id get
``call_<k>`` (k counts the calls of the conversation) and a tool message without ``tool_call_id``
answers the first call of the turn before it not yet answered. An assistant turn with null or empty
content is kept (the teacher regenerates it like any other).

Turn order: an optional system message, then user first; a user turn is followed by an assistant
turn, a plain assistant turn by a user turn, a tool-calling assistant turn by its tool outputs, and
tool outputs by more of them or an assistant turn. A conversation may end on any turn (what happens
to one ending on a user turn is the pseudo-label pipeline's ``pseudo_labels.ending_user_turn``).

A source's own names for ``id``, ``data``, ``conversations``, ``messages`` or ``system`` are mapped
by ``fields`` (``datasets.<name>.fields``). Every malformed record (bad JSON, invalid UTF-8, missing
field, empty conversation, wrong types, unknown role, a tool call that is not ``{name, arguments}``
with a JSON object as arguments, turns out of order, duplicate id) is reported with ``file:line``
(``file:row N`` for tables). With ``on_error="fail"`` the first one raises :class:`RecordError`
before anything is written; with ``on_error="skip"`` bad records go to a rejects jsonl (``file``,
``line`` or ``row``, ``kind``, ``error``, ``raw``) and are counted. The parquet's schema metadata
holds its provenance (``on_error``, the raw files' hashes, the counts).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from modelmake.chat import messages_type, plain_messages
from modelmake.errors import RecordError
from modelmake.files import digest, provenance_record, write_json, write_parquet
from modelmake.records import BadRecords, read_records

# a source's role (lower case) -> the canonical role; "call": an assistant turn whose text is a tool call
ROLE_ALIASES = {
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant",
    "system": "system",
    "function_call": "call",
    "tool": "tool", "observation": "tool", "function": "tool",
}


class BadRecord(ValueError):
    """A line that cannot be reformatted; the message says why, ``kind`` names its class.

    The classes (counted under ``reasons`` in the stats): bad JSON, invalid UTF-8, missing field,
    empty conversation, wrong type, unknown role, bad tool call, turns out of order, duplicate id.
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def content_id(messages: list[dict]) -> str:
    """A stable id for a record that has none: a hash of its canonical messages (the fields set)."""
    canon = json.dumps(plain_messages(messages), ensure_ascii=False, sort_keys=True, separators=(",", ":"))
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


def _optional_text(value, where: str) -> str | None:
    return None if value is None else _turn_text(value, where)


def _tool_call(value, where: str) -> dict:
    """One call, ``{name, arguments}`` (OpenAI's ``{id, type, function: {name, arguments}}``, or
    ``parameters`` for arguments), as the canonical ``{id, type, function: {name, arguments}}``
    with the arguments a JSON object encoded as a string; the id may still be None."""
    if not isinstance(value, dict):
        raise BadRecord("bad tool call", f"{where} must be an object with \"name\" and \"arguments\", "
                        f"got {type(value).__name__}")
    fn = value.get("function") if isinstance(value.get("function"), dict) else value
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise BadRecord("bad tool call", f'{where} has no function "name"')
    args = fn.get("arguments", fn.get("parameters", {}))
    if args is None or args == "":  # no arguments (vLLM reads both as {})
        args = {}
    if isinstance(args, str):
        try:
            decoded = json.loads(args)
        except json.JSONDecodeError as e:
            raise BadRecord("bad tool call", f'{where} "arguments" is not JSON ({e.msg})') from None
        if not isinstance(decoded, dict):
            raise BadRecord("bad tool call", f'{where} "arguments" must be a JSON object, got {type(decoded).__name__}')
        args = _check_utf8(args, f'{where} "arguments"')
    elif isinstance(args, dict):
        args = _check_utf8(json.dumps(args, ensure_ascii=False), f'{where} "arguments"')
    else:
        raise BadRecord("bad tool call", f'{where} "arguments" must be a JSON object, got {type(args).__name__}')
    call_id = value.get("id")
    if call_id is not None and not isinstance(call_id, str):
        raise BadRecord("bad tool call", f'{where} "id" must be a string, got {type(call_id).__name__}')
    return {"id": call_id, "type": "function", "function": {"name": _check_utf8(name, where), "arguments": args}}


def _tool_calls(value, where: str) -> list[dict]:
    """A list of calls (OpenAI ``tool_calls``), a single one, or a JSON text of either (ShareGPT's
    ``function_call`` value)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise BadRecord("bad tool call", f"{where} is not a JSON tool call ({e.msg}); expected "
                            '{"name": ..., "arguments": {...}} or a list of them') from None
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise BadRecord("bad tool call", f"{where} holds no tool call")
    return [_tool_call(c, f"{where} call {k}" if len(calls) > 1 else where) for k, c in enumerate(calls)]


def _turns(record: dict) -> list[dict]:
    """The record's turns as canonical messages, before the order is checked."""
    present = [k for k in ("data", "conversations", "messages") if record.get(k) is not None]  # a table's null: absent
    if present and present[0] == "data":
        turns = record["data"]
        if not isinstance(turns, list):
            raise BadRecord("wrong type", f'"data" must be a list of strings, got {type(turns).__name__}')
        return [
            {"role": "user" if i % 2 == 0 else "assistant",
             "content": _turn_text(t, f'"data" item at position {i}')}
            for i, t in enumerate(turns)
        ]
    if not present:
        raise BadRecord("missing field", 'missing field: expected "data", "conversations" or "messages"')
    key, role_key, text_key = (
        ("conversations", "from", "value") if present[0] == "conversations" else ("messages", "role", "content")
    )
    turns = record[key]
    if not isinstance(turns, list):
        raise BadRecord("wrong type", f'"{key}" must be a list of objects, got {type(turns).__name__}')
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn:
            raise BadRecord(
                "wrong type" if not isinstance(turn, dict) else "missing field",
                f'"{key}" item at position {i} must be an object with "{role_key}" and "{text_key}"'
            )
        role = turn[role_key]
        if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
            raise BadRecord(
                "unknown role", f'unknown role {role!r} at position {i}; known: {", ".join(sorted(ROLE_ALIASES))}'
            )
        role = ROLE_ALIASES[role.lower()]
        where = f'"{key}" item {i}'
        text = turn.get(text_key)
        calls = None
        if role == "call":
            role, calls, text = "assistant", _tool_calls(text, f'{where} "{text_key}"'), ""
        elif role == "assistant" and turn.get("tool_calls"):  # None or []: no call
            calls = _tool_calls(turn["tool_calls"], f'{where} "tool_calls"')
        elif role == "assistant" and turn.get("function_call"):  # the legacy OpenAI form
            calls = _tool_calls(turn["function_call"], f'{where} "function_call"')
        if text is None and role == "assistant":
            text = ""  # OpenAI: an assistant's content may be null (a tool call, or nothing said)
        elif text_key not in turn:
            raise BadRecord("missing field",
                            f'"{key}" item at position {i} must be an object with "{role_key}" and "{text_key}"')
        message = {"role": role, "content": _turn_text(text, f'{where} "{text_key}"')}
        name = _optional_text(turn.get("name"), f'{where} "name"')
        if name is not None:
            message["name"] = name
        if calls:
            message["tool_calls"] = calls
        if role == "tool":
            call_id = _optional_text(turn.get("tool_call_id"), f'{where} "tool_call_id"')
            if call_id is not None:
                message["tool_call_id"] = call_id
        messages.append(message)
    return messages


def _link_tool_calls(messages: list[dict]) -> None:
    """Give calls without an id ``call_<k>``, and tool messages without ``tool_call_id`` the id of
    the first call of the turn before them not yet answered."""
    k, pending = 0, []
    for m in messages:
        if m.get("tool_calls"):
            pending = []
            for call in m["tool_calls"]:
                if call["id"] is None:
                    call["id"] = f"call_{k}"
                k += 1
                pending.append(call["id"])
        elif m["role"] == "tool":
            if m.get("tool_call_id") in pending:
                pending.remove(m["tool_call_id"])
            elif "tool_call_id" not in m and pending:
                m["tool_call_id"] = pending.pop(0)


def _check_order(messages: list[dict]) -> None:
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not any(m["role"] in ("user", "assistant") for m in body):
        raise BadRecord("empty conversation", "empty conversation: no user or assistant turns")
    prev = None
    for i, m in enumerate(body):
        if prev is None:
            expected = ("user",)
        elif prev["role"] == "user":
            expected = ("assistant",)
        elif prev["role"] == "tool":
            expected = ("tool", "assistant")
        elif prev.get("tool_calls"):
            expected = ("tool",)
        else:
            expected = ("user",)
        if m["role"] not in expected:
            why = ("turns must alternate, user first" if set(expected) <= {"user", "assistant"}
                   else "a tool call is followed by its outputs, and they by the assistant's turn")
            raise BadRecord("turns out of order", f"turn {i} is {m['role']!r}, expected "
                            f"{' or '.join(repr(e) for e in expected)} ({why})")
        prev = m


def parse_messages(record) -> list[dict]:
    """The record's conversation as canonical messages (:mod:`modelmake.chat`); raises BadRecord
    when malformed."""
    if not isinstance(record, dict):
        raise BadRecord("wrong type", f"a record must be a JSON object, got {type(record).__name__}")
    messages = _turns(record)
    system = record.get("system")
    if system is not None:
        system = _turn_text(system, '"system"')
        if system.strip():
            if messages and messages[0]["role"] == "system":
                raise BadRecord("turns out of order", 'the record has a "system" field and a system message '
                                "at position 0: keep one")
            messages.insert(0, {"role": "system", "content": system})
    _link_tool_calls(messages)
    _check_order(messages)
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
    allow_empty: bool = False,
    config_key: str | None = None,
) -> ReformatStats:
    """Reformat raw chat sources (any :mod:`modelmake.records` source) into one parquet file; see the
    module docstring for the rules. ``fields``: {canonical name (id, data, conversations, messages):
    name in the source} (``datasets.<name>.fields``). No record left (empty sources, or every one
    rejected) raises :class:`RecordError` unless ``allow_empty`` (``datasets.<name>.allow_empty``,
    the ``config_key`` that errors name): an empty split would run through to empty labels."""
    import pyarrow as pa

    started = time.time()
    stats = ReformatStats()
    ids, rows = {}, []
    bad = BadRecords(on_error, "reformat.on_error")

    def unreadable(problem) -> None:
        stats.read += 1
        bad.unreadable(problem)

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
                bad.reject(where, e.kind, str(e), record)
                continue
            ids[rid] = str(where)  # the place, without the line it holds
            rows.append({"id": rid, "messages": messages})

    stats.written, stats.rejected, stats.reasons = len(rows), bad.rejected, bad.reasons
    if not rows and not allow_empty:
        key = config_key or "datasets.<name>"
        raise RecordError(
            f"no records in {', '.join(map(str, inputs))} ({stats.read} read, {stats.rejected} rejected): an "
            f"empty split would run through generation and training to empty results. Check {key}.splits, "
            f"or set {key}.allow_empty: true to accept it")
    schema = pa.schema([("id", pa.string()), ("messages", messages_type())])
    counts = {"read": stats.read, "written": stats.written, "rejected": stats.rejected,
              "reasons": stats.reasons}
    write_parquet(rows, out, schema=schema, provenance=provenance_record(
        config={"on_error": on_error}, inputs=inputs, counts=counts, started=started))
    if rejects is not None:
        bad.write(rejects)
    if stats_path is not None:
        write_json(stats_path, {"inputs": [str(p) for p in inputs], **counts,
                                "seconds": round(time.time() - started, 3)})
    return stats
