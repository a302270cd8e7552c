"""modelmake.reformat: raw chat jsonl -> {id, messages} parquet, and every malformed line reported
with file:line (on_error=fail) or moved to a rejects file and counted (on_error=skip)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from modelmake.errors import RecordError
from modelmake.reformat import reformat_files


def jline(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n"


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line if line.endswith(b"\n") else line + b"\n" for line in lines))
    return path


def read_rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


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


def test_output_schema_is_string_id_and_list_of_role_content_structs(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [jline({"id": "a", "data": ["q", "a"]})])
    out = tmp_path / "out.parquet"
    reformat_files([src], out)
    schema = pq.read_schema(out)
    assert schema.names == ["id", "messages"]
    assert str(schema.field("id").type) == "string"
    assert str(schema.field("messages").type) == "list<element: struct<role: string, content: string>>"


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
