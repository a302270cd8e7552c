"""modelmake.reformat: raw chat jsonl -> {id, messages} parquet, and every malformed line reported
with file:line (on_error=fail) or moved to a rejects file and counted (on_error=skip)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from modelmake.chat import plain_messages
from modelmake.errors import RecordError
from modelmake.reformat import reformat_files


def jline(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n"


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line if line.endswith(b"\n") else line + b"\n" for line in lines))
    return path


def read_rows(path: Path) -> list[dict]:
    """The rows with each conversation as consumers read it (the fields set: chat.plain_messages)."""
    return [{**r, "messages": plain_messages(r["messages"])} for r in pq.read_table(path).to_pylist()]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- the three input shapes ---------------------------------------------------------------------


def test_all_three_shapes_become_id_and_role_content_messages(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [
        jline({"id": "uc", "data": ["q1", "a1", "q2", "a2"]}),
        jline({"id": "sg", "conversations": [
            {"from": "system", "value": "be nice"},
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello"},
            {"from": "Human", "value": "more"},
            {"from": "chatgpt", "value": "sure"},
        ]}),
        jline({"id": 7, "messages": [
            {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
        ]}),
    ])
    out = tmp_path / "out.parquet"

    stats = reformat_files([src], out)

    assert (stats.read, stats.written, stats.rejected) == (3, 3, 0)
    assert read_rows(out) == [
        {"id": "uc", "messages": [
            {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"},
        ]},
        {"id": "sg", "messages": [
            {"role": "system", "content": "be nice"},
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "more"}, {"role": "assistant", "content": "sure"},
        ]},
        {"id": "7", "messages": [  # integer ids become strings
            {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
        ]},
    ]


def test_output_schema_is_string_id_and_list_of_openai_message_structs(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [jline({"id": "a", "data": ["q", "a"]})])
    out = tmp_path / "out.parquet"
    reformat_files([src], out)
    schema = pq.read_schema(out)
    assert schema.names == ["id", "messages"]
    assert str(schema.field("id").type) == "string"
    assert str(schema.field("messages").type) == (
        "list<element: struct<role: string, content: string, name: string, tool_calls: list<element: "
        "struct<id: string, type: string, function: struct<name: string, arguments: string>>>, "
        "tool_call_id: string>>")


def test_several_input_files_are_concatenated_in_order(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", [jline({"id": "a1", "data": ["q", "a"]})])
    b = write_lines(tmp_path / "b.jsonl", [jline({"id": "b1", "data": ["q", "a"]}),
                                           jline({"id": "b2", "data": ["q", "a"]})])
    out = tmp_path / "out.parquet"
    reformat_files([a, b], out)
    assert [r["id"] for r in read_rows(out)] == ["a1", "b1", "b2"]


# --- content-hash ids ---------------------------------------------------------------------------


def test_record_without_id_gets_a_content_hash_id_that_is_stable(tmp_path):
    out1, out2 = tmp_path / "1.parquet", tmp_path / "2.parquet"
    reformat_files([write_lines(tmp_path / "1.jsonl", [jline({"data": ["q", "a"]})])], out1)
    # the same conversation in another shape, file and run gets the same id
    reformat_files([write_lines(tmp_path / "2.jsonl", [jline({"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})])], out2)
    (r1,), (r2,) = read_rows(out1), read_rows(out2)
    assert r1["id"] == r2["id"]
    assert re.fullmatch(r"h-[0-9a-f]{16}", r1["id"])
    # Golden value: sha256 of the canonical messages, so independent of Python's hash seed and the
    # machine. Changing it re-ids every record that has no id.
    assert r1["id"] == "h-802c07c64a696eb4"


def test_different_content_gets_a_different_content_hash_id(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [
        jline({"data": ["q", "a"]}),
        jline({"data": ["q", "b"]}),
        jline({"data": ["Q", "a"]}),
        jline({"conversations": [{"from": "system", "value": "s"},
                                 {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}),
    ])
    out = tmp_path / "out.parquet"
    stats = reformat_files([src], out)
    ids = [r["id"] for r in read_rows(out)]
    assert stats.written == 4
    assert len(set(ids)) == 4
    assert all(i.startswith("h-") for i in ids)


# --- malformed lines ----------------------------------------------------------------------------

GOOD_1 = jline({"id": "g1", "data": ["q", "a"]})
GOOD_4 = jline({"id": "g4", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})

# (test id, bad line, kind counted in stats, a fragment the error must contain)
MALFORMED = [
    ("bad_json", b'{"id": "b", "data": ["q", "a"]\n', "bad JSON", "bad JSON"),
    ("deeply_nested_json", b"[" * 100_000 + b"\n", "bad JSON", "nested too deeply"),
    ("invalid_utf8", b'{"id": "b", "data": ["caf\xe9", "a"]}\n', "invalid UTF-8", "invalid UTF-8"),
    ("lone_surrogate_escape", b'{"id": "b", "data": ["q \\ud800", "a"]}\n', "invalid UTF-8", "surrogate"),
    ("missing_field", jline({"id": "b", "text": "q"}), "missing field", "missing field"),
    ("missing_turn_field", jline({"id": "b", "conversations": [{"from": "human"}]}),
     "missing field", '"from" and "value"'),
    ("empty_conversation", jline({"id": "b", "data": []}), "empty conversation", "empty conversation"),
    ("only_system_turn", jline({"id": "b", "messages": [{"role": "system", "content": "s"}]}),
     "empty conversation", "empty conversation"),
    ("int_in_data", jline({"id": "b", "data": ["q", 5]}), "wrong type", "must be a string, got int"),
    ("data_not_a_list", jline({"id": "b", "data": "q"}), "wrong type", "must be a list"),
    ("record_not_an_object", jline(["q", "a"]), "wrong type", "must be a JSON object"),
    ("float_id", jline({"id": 1.5, "data": ["q", "a"]}), "wrong type", '"id" must be'),
    ("unknown_role", jline({"id": "b", "conversations": [{"from": "robot", "value": "q"}]}),
     "unknown role", "unknown role 'robot'"),
    ("turns_out_of_order", jline({"id": "b", "conversations": [
        {"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}),
     "turns out of order", "expected 'user'"),
    ("two_user_turns", jline({"id": "b", "messages": [
        {"role": "user", "content": "q"}, {"role": "user", "content": "q2"}]}),
     "turns out of order", "expected 'assistant'"),
    ("duplicate_id", jline({"id": "g1", "data": ["other", "content"]}), "duplicate id", "duplicate id 'g1'"),
    ("function_call_not_json", jline({"id": "b", "conversations": [
        {"from": "human", "value": "q"}, {"from": "function_call", "value": "get_weather(Paris)"}]}),
     "bad tool call", '"conversations" item 1 "value" is not a JSON tool call'),
    ("tool_arguments_not_an_object", jline({"id": "b", "messages": [{"role": "user", "content": "q"}, {
        "role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": '"Paris"'}}]}]}),
     "bad tool call", '"arguments" must be a JSON object, got str'),
    ("tool_call_without_name", jline({"id": "b", "messages": [{"role": "user", "content": "q"}, {
        "role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]}]}),
     "bad tool call", 'no function "name"'),
    ("tool_output_after_a_user_turn", jline({"id": "b", "conversations": [
        {"from": "human", "value": "q"}, {"from": "observation", "value": "{}"}]}),
     "turns out of order", "turn 1 is 'tool', expected 'assistant'"),
    ("user_turn_after_a_tool_call", jline({"id": "b", "conversations": [
        {"from": "human", "value": "q"}, {"from": "function_call", "value": '{"name": "f", "arguments": {}}'},
        {"from": "human", "value": "q2"}]}),
     "turns out of order", "turn 2 is 'user', expected 'tool'"),
    ("system_field_and_system_message", jline({"id": "b", "system": "s1", "messages": [
        {"role": "system", "content": "s2"}, {"role": "user", "content": "q"}]}),
     "turns out of order", 'a "system" field and a system message'),
    ("name_not_a_string", jline({"id": "b", "messages": [{"role": "user", "content": "q", "name": 5}]}),
     "wrong type", '"name" must be a string, got int'),
    ("null_user_content", jline({"id": "b", "messages": [{"role": "user", "content": None}]}),
     "wrong type", "must be a string, got NoneType"),
]


def bad_input(tmp_path: Path, bad: bytes) -> tuple[Path, Path]:
    """A good file, then a file whose line 3 is bad (line 2 is blank, so numbering counts it)."""
    good = write_lines(tmp_path / "good.jsonl", [GOOD_1])
    mixed = write_lines(tmp_path / "mixed.jsonl", [jline({"id": "m1", "data": ["q", "a"]}), b"", bad, GOOD_4])
    return good, mixed


@pytest.mark.parametrize("bad,kind,fragment", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_bad_line_fails_with_file_and_line_and_writes_nothing(tmp_path, bad, kind, fragment):
    good, mixed = bad_input(tmp_path, bad)
    out, rejects, stats = tmp_path / "out.parquet", tmp_path / "rejects.jsonl", tmp_path / "stats.json"

    with pytest.raises(RecordError) as info:
        reformat_files([good, mixed], out, on_error="fail", rejects=rejects, stats_path=stats)

    msg = str(info.value)
    assert f"{mixed}:3:" in msg, msg
    assert fragment in msg
    assert "reformat.on_error: skip" in msg
    assert not out.exists()
    assert not rejects.exists()
    assert not stats.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.jsonl", "mixed.jsonl"]  # no .tmp left


@pytest.mark.parametrize("bad,kind,fragment", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_bad_line_is_skipped_to_rejects_and_counted(tmp_path, bad, kind, fragment):
    good, mixed = bad_input(tmp_path, bad)
    out, rejects, stats_path = tmp_path / "out.parquet", tmp_path / "rejects.jsonl", tmp_path / "stats.json"

    stats = reformat_files([good, mixed], out, on_error="skip", rejects=rejects, stats_path=stats_path)

    assert [r["id"] for r in read_rows(out)] == ["g1", "m1", "g4"]
    (reject,) = read_jsonl(rejects)
    assert reject["file"] == str(mixed)
    assert reject["line"] == 3
    assert fragment in reject["error"]
    assert reject["raw"] == bad.rstrip(b"\n").decode("utf-8", errors="replace")
    counted = json.loads(stats_path.read_text())
    assert counted["read"] == 4 == stats.read  # the blank line is not a record
    assert counted["written"] == 3 == stats.written
    assert counted["rejected"] == 1 == stats.rejected
    assert counted["reasons"] == {kind: 1} == stats.reasons


def test_skip_counts_reasons_by_class_across_many_bad_lines(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [
        jline({"id": "a", "data": ["q", "a"]}),
        b"{not json\n",
        jline({"id": "b", "data": ["q", 1]}),
        jline({"id": "c", "data": [None, "a"]}),
        jline({"id": "a", "data": ["q", "z"]}),
        jline({"id": "x", "conversations": [{"from": "robot", "value": "q"}]}),
        jline({"id": "y", "conversations": [{"from": "alien", "value": "q"}]}),
        jline({"id": "d", "data": ["q", "a"]}),
    ])
    out, rejects = tmp_path / "out.parquet", tmp_path / "rejects.jsonl"
    stats = reformat_files([src], out, on_error="skip", rejects=rejects)
    assert [r["id"] for r in read_rows(out)] == ["a", "d"]
    assert [r["line"] for r in read_jsonl(rejects)] == [2, 3, 4, 5, 6, 7]
    assert stats.reasons == {"bad JSON": 1, "wrong type": 2, "duplicate id": 1, "unknown role": 2}
    assert stats.read == stats.written + stats.rejected == 8


def test_failing_run_leaves_existing_outputs_untouched(tmp_path):
    _, mixed = bad_input(tmp_path, b"{oops\n")
    out, rejects, stats = tmp_path / "out.parquet", tmp_path / "rejects.jsonl", tmp_path / "stats.json"
    # a previous good run produced these
    reformat_files([write_lines(tmp_path / "prev.jsonl", [GOOD_1])], out, rejects=rejects, stats_path=stats)
    before = {p: p.read_bytes() for p in (out, rejects, stats)}

    with pytest.raises(RecordError):
        reformat_files([mixed], out, on_error="fail", rejects=rejects, stats_path=stats)

    assert {p: p.read_bytes() for p in (out, rejects, stats)} == before
    assert [r["id"] for r in read_rows(out)] == ["g1"]
    assert not list(tmp_path.glob("*.tmp"))


def test_reformatted_parquet_carries_its_provenance(tmp_path):
    from modelmake.files import read_provenance, sha256_file

    _, mixed = bad_input(tmp_path, b"{oops\n")
    out = tmp_path / "out.parquet"
    reformat_files([mixed], out, on_error="skip", rejects=tmp_path / "rejects.jsonl")

    prov = read_provenance(out)
    assert prov["config"] == {"on_error": "skip"}
    assert prov["inputs"] == {str(mixed): sha256_file(mixed)}
    assert prov["counts"] == {"read": 3, "written": 2, "rejected": 1, "reasons": {"bad JSON": 1}}
    assert prov["code_version"] and prov["wall_seconds"] >= 0


def test_fail_stops_at_the_first_bad_line(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [GOOD_1, jline({"id": "b", "data": []}), b"{oops\n"])
    with pytest.raises(RecordError, match=re.escape(f"{src}:2:")):
        reformat_files([src], tmp_path / "out.parquet", on_error="fail")


def test_clean_input_with_skip_writes_an_empty_rejects_file(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [GOOD_1, GOOD_4])
    out, rejects = tmp_path / "out.parquet", tmp_path / "rejects.jsonl"
    stats = reformat_files([src], out, on_error="skip", rejects=rejects)
    assert rejects.read_bytes() == b""
    assert (stats.written, stats.rejected, stats.reasons) == (2, 0, {})


def test_unknown_on_error_value_is_refused(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [GOOD_1])
    with pytest.raises(ValueError, match="on_error"):
        reformat_files([src], tmp_path / "out.parquet", on_error="ignore")
    assert not (tmp_path / "out.parquet").exists()


# --- other sources: any shape modelmake.records reads -------------------------------------------


def test_a_parquet_chat_file_with_its_own_field_names_is_reformatted(tmp_path):
    import pyarrow as pa

    src = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"conversation_id": "p1", "conversation": [{"role": "user", "content": "q"},
                                                   {"role": "assistant", "content": "a"}]},
        {"conversation_id": "p2", "conversation": [{"role": "assistant", "content": "first"}]},
        {"conversation_id": "p3", "conversation": [{"role": "user", "content": "q3"},
                                                   {"role": "assistant", "content": "a3"}]},
    ]), src)
    out, rejects = tmp_path / "out.parquet", tmp_path / "rejects.jsonl"

    stats = reformat_files([src], out, on_error="skip", rejects=rejects,
                           fields={"id": "conversation_id", "messages": "conversation"})

    assert [r["id"] for r in read_rows(out)] == ["p1", "p3"]
    assert read_rows(out)[0]["messages"] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    (reject,) = read_jsonl(rejects)
    assert (reject["file"], reject["row"], reject["kind"]) == (str(src), 2, "turns out of order")
    assert json.loads(reject["raw"])["conversation_id"] == "p2"
    assert (stats.read, stats.written, stats.rejected) == (3, 2, 1)
    with pytest.raises(RecordError, match=re.escape(f"{src}:row 2: turn 0 is 'assistant'")):
        reformat_files([src], out, fields={"id": "conversation_id", "messages": "conversation"})


def test_a_jsonl_with_a_byte_order_mark_is_read_from_line_1(tmp_path):
    src = write_lines(tmp_path / "bom.jsonl", [b"\xef\xbb\xbf" + GOOD_1, b"\xef\xbb\xbf{oops\n", GOOD_4])
    out, rejects = tmp_path / "out.parquet", tmp_path / "rejects.jsonl"
    stats = reformat_files([src], out, on_error="skip", rejects=rejects)
    assert [r["id"] for r in read_rows(out)] == ["g1", "g4"]  # line 1 is a record, not bad JSON
    assert [(r["line"], r["kind"]) for r in read_jsonl(rejects)] == [(2, "bad JSON")]  # a BOM only opens a file
    assert stats.read == 3


def test_gzip_json_lines_and_a_table_null_column_reformat_alike(tmp_path):
    import gzip

    import pyarrow as pa

    gz = tmp_path / "chat.jsonl.gz"
    gz.write_bytes(gzip.compress(GOOD_1 + GOOD_4))
    table = tmp_path / "chat.parquet"  # a table has every column in every row: null is absent
    pq.write_table(pa.Table.from_pylist([{"id": "t1", "data": None, "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]), table)
    out = tmp_path / "out.parquet"
    reformat_files([gz, table], out)
    assert [r["id"] for r in read_rows(out)] == ["g1", "g4", "t1"]


def test_a_split_without_records_is_an_error_naming_the_key_unless_allowed(tmp_path):
    empty = write_lines(tmp_path / "empty.jsonl", [])
    out = tmp_path / "out.parquet"
    with pytest.raises(RecordError, match=f"no records in {empty} \\(0 read, 0 rejected\\).*"
                                          "Check datasets.chat.splits, or set datasets.chat.allow_empty: true"):
        reformat_files([empty], out, config_key="datasets.chat")
    assert not out.exists()
    bad = write_lines(tmp_path / "bad.jsonl", [b'{"id": "x"}'])  # every record rejected
    with pytest.raises(RecordError, match="\\(1 read, 1 rejected\\)"):
        reformat_files([bad], out, on_error="skip", config_key="datasets.chat")
    stats = reformat_files([empty], out, allow_empty=True)
    assert stats.written == 0 and pq.read_table(out).num_rows == 0


# --- tool turns, a system field, names: the canonical OpenAI shape ------------------------------

GLAIVE = {  # ShareGPT as glaive / LLaMA-Factory write tool use: a system field, function_call and observation
    "id": "glaive-1",
    "system": "You can call get_weather.",
    "tools": '[{"name": "get_weather", "parameters": {"city": {"type": "string"}}}]',
    "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": '{"temp": 21}'},
        {"from": "gpt", "value": "It is 21 degrees."},
        {"from": "human", "value": "And Rome and Oslo?"},
        {"from": "function_call", "value": '[{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}, '
                                           '{"name": "get_weather", "parameters": {"city": "Oslo"}}]'},
        {"from": "observation", "value": '{"temp": 25}'},
        {"from": "observation", "value": '{"temp": 8}'},
        {"from": "gpt", "value": ""},  # an empty answer: kept, the teacher regenerates it
        {"from": "human", "value": "Thanks!"},  # ends on a user turn: kept (pseudo_labels.ending_user_turn)
    ],
}


def call(cid: str, name: str, arguments: str) -> dict:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": arguments}}


GLAIVE_MESSAGES = [
    {"role": "system", "content": "You can call get_weather."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [call("call_0", "get_weather", '{"city": "Paris"}')]},
    {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_0"},
    {"role": "assistant", "content": "It is 21 degrees."},
    {"role": "user", "content": "And Rome and Oslo?"},
    {"role": "assistant", "content": "", "tool_calls": [call("call_1", "get_weather", '{"city": "Rome"}'),
                                                        call("call_2", "get_weather", '{"city": "Oslo"}')]},
    {"role": "tool", "content": '{"temp": 25}', "tool_call_id": "call_1"},
    {"role": "tool", "content": '{"temp": 8}', "tool_call_id": "call_2"},
    {"role": "assistant", "content": ""},
    {"role": "user", "content": "Thanks!"},
]

OPENAI = {  # OpenAI messages: tool_calls with null content, tool messages with tool_call_id and name
    "id": "oai-1",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?", "name": "alice"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c-9", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "tool_call_id": "c-9", "name": "add", "content": "5"},
        {"role": "assistant", "content": "5.", "name": "calc-bot", "tool_calls": []},  # [] is no call
    ],
}

OPENAI_MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+3?", "name": "alice"},
    {"role": "assistant", "content": "", "tool_calls": [call("c-9", "add", '{"a": 2, "b": 3}')]},
    {"role": "tool", "content": "5", "name": "add", "tool_call_id": "c-9"},
    {"role": "assistant", "content": "5.", "name": "calc-bot"},
]

LEGACY = {  # OpenAI's legacy functions: an assistant function_call, a function message with the result
    "id": "legacy-1",
    "messages": [
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": None, "function_call": {"name": "now", "arguments": "{}"}},
        {"role": "function", "name": "now", "content": "12:00"},
        {"role": "assistant", "content": None},  # null content, no call: an empty answer
    ],
}

LEGACY_MESSAGES = [
    {"role": "user", "content": "Time?"},
    {"role": "assistant", "content": "", "tool_calls": [call("call_0", "now", "{}")]},
    {"role": "tool", "content": "12:00", "name": "now", "tool_call_id": "call_0"},
    {"role": "assistant", "content": ""},
]


def test_tool_turns_a_system_field_and_names_become_openai_messages(tmp_path):
    src = write_lines(tmp_path / "tools.jsonl", [b"\xef\xbb\xbf" + jline(GLAIVE), jline(OPENAI), jline(LEGACY)])
    out = tmp_path / "out.parquet"

    stats = reformat_files([src], out)

    assert (stats.read, stats.written, stats.rejected) == (3, 3, 0)
    assert read_rows(out) == [{"id": "glaive-1", "messages": GLAIVE_MESSAGES},
                              {"id": "oai-1", "messages": OPENAI_MESSAGES},
                              {"id": "legacy-1", "messages": LEGACY_MESSAGES}]


def test_an_empty_system_field_is_ignored_and_a_mapped_one_is_read(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [
        jline({"id": "a", "system": "", "data": ["q", "a"]}),
        jline({"id": "b", "prompt_system": "Be kind.", "conversations": [{"from": "human", "value": "q"}]}),
    ])
    out = tmp_path / "out.parquet"
    reformat_files([src], out, fields={"system": "prompt_system"})
    assert [r["messages"] for r in read_rows(out)] == [
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "q"}],
    ]


def test_tool_conversations_read_alike_from_jsonl_gz_parquet_and_a_datasets_folder(tmp_path):
    """The same conversations through the three other shapes users keep them in: in a table every
    row has every field (null where a message has none), arguments stay JSON text."""
    import gzip

    import datasets
    import pyarrow as pa

    gz = tmp_path / "tools.jsonl.gz"
    gz.write_bytes(gzip.compress(b"\xef\xbb\xbf" + jline(GLAIVE)))
    table = tmp_path / "tools.parquet"
    pq.write_table(pa.Table.from_pylist([OPENAI, LEGACY]), table)
    folder = tmp_path / "tools_ds"
    datasets.Dataset.from_list([{**OPENAI, "id": "oai-2"}, {**LEGACY, "id": "legacy-2"}]).save_to_disk(str(folder))
    out = tmp_path / "out.parquet"

    stats = reformat_files([gz, table, folder], out)

    assert stats.written == 5
    assert read_rows(out) == [
        {"id": "glaive-1", "messages": GLAIVE_MESSAGES},
        {"id": "oai-1", "messages": OPENAI_MESSAGES}, {"id": "legacy-1", "messages": LEGACY_MESSAGES},
        {"id": "oai-2", "messages": OPENAI_MESSAGES}, {"id": "legacy-2", "messages": LEGACY_MESSAGES},
    ]


def test_a_bad_tool_turn_in_a_table_is_named_by_its_row(tmp_path):
    import datasets

    folder = tmp_path / "tools_ds"
    datasets.Dataset.from_list([
        {"id": "ok", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"id": "bad", "conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "f(1)"}]},
        {"id": "robot", "conversations": [{"from": "robot", "value": "q"}]},
    ]).save_to_disk(str(folder))
    out, rejects = tmp_path / "out.parquet", tmp_path / "rejects.jsonl"

    with pytest.raises(RecordError, match=re.escape(f"bad record in {folder}:row 2: ") + ".*not a JSON tool call"):
        reformat_files([folder], out)
    stats = reformat_files([folder], out, on_error="skip", rejects=rejects)

    assert [r["id"] for r in read_rows(out)] == ["ok"]
    assert [(r["row"], r["kind"]) for r in read_jsonl(rejects)] == [(2, "bad tool call"), (3, "unknown role")]
    assert stats.reasons == {"bad tool call": 1, "unknown role": 1}
