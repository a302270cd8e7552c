"""modelmake.records: one reader for users' records in every shape (JSON lines plain, gzip and zstd,
a JSON array, parquet, CSV, a datasets folder, a hub id), each giving the same records with their
place (file:line, file:row N), a BOM tolerated, field names mapped, bad records named by place."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO, run_snakemake, small_config, write_config
from modelmake.errors import RecordError
from modelmake.records import SUPPORTED, read_records, source_problem
from modelmake.reformat import reformat_files

RECORDS = [
    {"id": "a", "text": "héllo 月亮", "n": 1, "messages": [{"role": "user", "content": "q"}], "tags": ["x", "y"]},
    {"id": "b", "text": "second", "n": 2, "messages": [{"role": "assistant", "content": "r"}], "tags": []},
    {"id": "c", "text": "third", "n": 3, "messages": [], "tags": ["z"]},
]
FLAT = [{"id": r["id"], "text": r["text"], "n": str(r["n"])} for r in RECORDS]  # CSV cells are text


def jsonl_bytes(records, bom=False) -> bytes:
    body = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)
    return (b"\xef\xbb\xbf" if bom else b"") + body


def zstd(data: bytes) -> bytes:
    zstandard = pytest.importorskip("zstandard")
    return zstandard.ZstdCompressor().compress(data)


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def save_to_disk(folder: Path, records) -> str:
    import datasets

    datasets.Dataset.from_list(records).save_to_disk(str(folder))
    return str(folder)


LINES = [f":{i}" for i in (1, 2, 3)]
ROWS = [f":row {i}" for i in (1, 2, 3)]

# (name, make(tmp) -> source, the place suffixes of the three records)
SHAPES = {
    "jsonl": (lambda t: write(t / "r.jsonl", jsonl_bytes(RECORDS)), LINES),
    "jsonl with BOM": (lambda t: write(t / "r.jsonl", jsonl_bytes(RECORDS, bom=True)), LINES),
    "jsonl.gz": (lambda t: write(t / "r.jsonl.gz", gzip.compress(jsonl_bytes(RECORDS))), LINES),
    "jsonl.gz with BOM": (lambda t: write(t / "r.jsonl.gz", gzip.compress(jsonl_bytes(RECORDS, bom=True))), LINES),
    "jsonl.zst": (lambda t: write(t / "r.jsonl.zst", zstd(jsonl_bytes(RECORDS))), LINES),
    "json lines (C4 .json.gz)": (lambda t: write(t / "c4-train.00000-of-01024.json.gz",
                                                 gzip.compress(jsonl_bytes(RECORDS))), LINES),
    "json array": (lambda t: write(t / "r.json", json.dumps(RECORDS, ensure_ascii=False, indent=2).encode()), ROWS),
    "json array with BOM": (lambda t: write(t / "r.json", b"\xef\xbb\xbf" + json.dumps(RECORDS).encode()), ROWS),
    "json array zst": (lambda t: write(t / "r.json.zst", zstd(json.dumps(RECORDS).encode())), ROWS),
    "parquet": (lambda t: pq.write_table(pa.Table.from_pylist(RECORDS), t / "r.parquet", row_group_size=2)
                or str(t / "r.parquet"), ROWS),
    "datasets folder": (lambda t: save_to_disk(t / "saved", RECORDS), ROWS),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_yields_the_same_records_with_their_place(tmp_path, shape):
    make, places = SHAPES[shape]
    source = make(tmp_path)

    got = list(read_records(source))

    assert [rec for _, rec in got] == RECORDS
    assert [str(where) for where, _ in got] == [source + p for p in places]


def test_a_zstd_file_of_several_frames_is_read_to_its_end(tmp_path):
    """zstd -c a b > c, or a parallel compressor, writes one frame per part."""
    source = write(tmp_path / "r.jsonl.zst", zstd(jsonl_bytes(RECORDS[:2])) + zstd(jsonl_bytes(RECORDS[2:])))
    assert [r for _, r in read_records(source)] == RECORDS


def test_values_from_tables_are_plain_python(tmp_path):
    source = SHAPES["parquet"][0](tmp_path)
    (_, rec), *_ = read_records(source)
    assert type(rec["messages"]) is list and type(rec["messages"][0]) is dict and type(rec["tags"]) is list
    assert json.dumps(rec, ensure_ascii=False)  # JSON-able as it comes


@pytest.mark.parametrize("bom", [False, True])
def test_csv_rows_are_text_cells_named_by_the_header(tmp_path, bom):
    text = "id,text,n\r\n" + "".join(f'{r["id"]},"{r["text"]}",{r["n"]}\r\n' for r in FLAT)
    source = write(tmp_path / "r.csv", (b"\xef\xbb\xbf" if bom else b"") + text.encode())
    got = list(read_records(source))
    assert [rec for _, rec in got] == FLAT
    assert [str(w) for w, _ in got] == [source + p for p in ROWS]


def test_a_csv_cell_may_span_lines_and_be_long(tmp_path):
    long = "word " * 40_000  # past csv's default 128 KiB per cell
    source = write(tmp_path / "r.csv.gz", gzip.compress(f'id,text\na,"two\nlines"\nb,{long}\n'.encode()))
    assert [(str(w), r["text"]) for w, r in read_records(source)] == [(f"{source}:row 1", "two\nlines"),
                                                                       (f"{source}:row 2", long)]


def test_blank_lines_are_skipped_and_lines_keep_their_numbers(tmp_path):
    source = write(tmp_path / "in.jsonl", b'{"id": "a"}\n\n  \n{"id": "b"}\n')
    got = [(w.line, w.row, w.file, r["id"]) for w, r in read_records(source)]
    assert got == [(1, None, source, "a"), (4, None, source, "b")]


# --- field maps ----------------------------------------------------------------------------------


def test_a_field_map_gives_records_their_canonical_names(tmp_path):
    source = write(tmp_path / "c4.json.gz", gzip.compress(jsonl_bytes([{"raw_content": "t1", "url": "u"}])))
    ((_, rec),) = read_records(source, fields={"text": "raw_content"}, required=("text",))
    assert rec["text"] == "t1"


def test_a_missing_mapped_field_names_the_config_key_to_set(tmp_path):
    source = write(tmp_path / "web.jsonl", jsonl_bytes([{"raw_content": "ok"}, {"content": "moved"}]))
    with pytest.raises(RecordError) as e:
        list(read_records(source, fields={"text": "raw_content"}, required=("text",),
                          config_key={"text": "distill.web.text_field"}))
    msg = str(e.value)
    assert f"{source}:2: no field 'raw_content'" in msg and "set distill.web.text_field" in msg and "content" in msg


def test_a_missing_unmapped_field_names_the_map_key_to_set(tmp_path):
    source = write(tmp_path / "r.parquet", b"")
    pq.write_table(pa.Table.from_pylist([{"question": "q"}]), source)
    with pytest.raises(RecordError, match=re.escape(f"{source}:row 1: no field 'prompt'") + ".*router.fields.prompt"):
        list(read_records(source, required=("prompt",), config_key="router.fields"))


# --- bad records and unreadable sources ----------------------------------------------------------


@pytest.mark.parametrize("line, error", [
    (b"{not json\n", "bad JSON: Expecting property name"),
    (b'{"id": "caf\xe9"}\n', "invalid UTF-8 at byte"),
    (b"[1, 2]\n", "a record must be a JSON object, got list"),
    (b"[" * 100_000 + b"\n", "bad JSON: nested too deeply"),
])
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".json"])
def test_a_bad_line_is_named_by_file_and_line(tmp_path, line, error, suffix):
    data = b'{"id": "a"}\n\n' + line
    source = write(tmp_path / f"in{suffix}", gzip.compress(data) if suffix.endswith(".gz") else data)
    with pytest.raises(RecordError, match=re.escape(f"bad record in {source}:3: {error}")):
        list(read_records(source))


def test_records_stream_the_first_comes_before_a_later_line_is_read(tmp_path):
    source = write(tmp_path / "in.jsonl", b'{"id": "a"}\n{broken\n')
    records = read_records(source)
    assert next(records)[1] == {"id": "a"}
    with pytest.raises(RecordError, match=":2:"):
        next(records)


def test_utf16_is_named_as_such(tmp_path):
    source = write(tmp_path / "in.jsonl", '{"id": "a"}\n'.encode("utf-16"))
    with pytest.raises(RecordError, match=":1: invalid UTF-8: the file is UTF-16"):
        list(read_records(source))


def test_bad_items_of_a_json_array_are_named_by_row_and_broken_json_by_line(tmp_path):
    source = write(tmp_path / "a.json", b'[\n  {"id": "a"},\n  "text",\n  {"id": "c"}\n]\n')
    with pytest.raises(RecordError, match=re.escape(f"{source}:row 2: a record must be a JSON object, got str")):
        list(read_records(source))
    source = write(tmp_path / "b.json", b'[\n  {"id": "a"},\n  {"id": "b",}\n]\n')
    with pytest.raises(RecordError, match=re.escape(f"{source}:3: Expecting property name")):
        list(read_records(source))


def test_a_csv_row_of_the_wrong_width_is_named_by_row(tmp_path):
    source = write(tmp_path / "r.csv", b"id,text\na,b\nc,d,e\n")
    with pytest.raises(RecordError, match=re.escape(f"{source}:row 2: 3 cells, the header has 2")):
        list(read_records(source))


def test_with_on_bad_the_bad_records_are_handed_over_and_the_rest_read(tmp_path):
    source = write(tmp_path / "in.jsonl", b'\xef\xbb\xbf{"id": "a"}\n{oops\n[1]\n{"x": 1}\n{"id": "e"}\n')
    problems = []
    got = [(w.line, r["id"]) for w, r in read_records(source, required=("id",), on_bad=problems.append)]
    assert got == [(1, "a"), (5, "e")]
    assert [(p.where.line, p.kind, p.where.raw) for p in problems] == [
        (2, "bad JSON", "{oops"), (3, "wrong type", "[1]"), (4, "missing field", '{"x": 1}')]


def test_a_truncated_compressed_file_is_refused_not_read_short(tmp_path):
    data = gzip.compress(jsonl_bytes(RECORDS * 50))
    source = write(tmp_path / "cut.jsonl.gz", data[: len(data) // 2])
    with pytest.raises(RecordError, match="corrupt or truncated"):
        list(read_records(source))
    source = write(tmp_path / "fake.json.gz", jsonl_bytes(RECORDS))  # not gzip at all
    with pytest.raises(RecordError, match="gzip data"):
        list(read_records(source))


def test_an_unknown_format_names_the_supported_ones(tmp_path):
    source = write(tmp_path / "r.txt", b"hello\n")
    with pytest.raises(RecordError, match=re.escape("unknown format (by its suffix); modelmake reads .csv")):
        list(read_records(source))
    assert ".jsonl.zst" in SUPPORTED and "save_to_disk" in SUPPORTED and "hf://" in SUPPORTED


def test_folders_and_missing_files_say_what_is_wrong(tmp_path):
    import datasets

    d = datasets.Dataset.from_list(RECORDS)
    datasets.DatasetDict({"train": d, "test": d}).save_to_disk(str(tmp_path / "dict"))
    assert "holds the datasets splits test, train" in source_problem(tmp_path / "dict")
    assert source_problem(tmp_path / "dict" / "train") is None
    assert "not one saved by datasets' save_to_disk" in source_problem(tmp_path)
    assert "does not exist" in source_problem(tmp_path / "nope.jsonl")
    assert source_problem("hf://owner/name:en@train") is None  # not checked: needs the hub
    with pytest.raises(RecordError, match="holds the datasets splits"):
        list(read_records(tmp_path / "dict"))


# --- hub ids, offline ------------------------------------------------------------------------------


def test_a_hub_id_reads_through_load_dataset_here_on_a_local_folder(tmp_path):
    """The real datasets.load_dataset, streaming, on a local folder: the hub path without the hub."""
    folder = tmp_path / "hubish"
    folder.mkdir()
    write(folder / "part-0.jsonl", jsonl_bytes(RECORDS[:2]))
    source = f"hf://{folder}@train"
    got = list(read_records(source, fields={"body": "text"}))
    assert [r["id"] for _, r in got] == ["a", "b"] and got[0][1]["body"] == RECORDS[0]["text"]
    assert got[0][1]["messages"] == RECORDS[0]["messages"]
    assert [str(w) for w, _ in got] == [f"{source}:row 1", f"{source}:row 2"]


def test_a_hub_id_names_dataset_config_and_split(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, *, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        return datasets.Dataset.from_list(RECORDS).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    got = list(read_records("hf://allenai/c4:en@validation"))
    assert calls == [("allenai/c4", "en", "validation", True)]
    assert [r for _, r in got] == RECORDS and str(got[2][0]) == "hf://allenai/c4:en@validation:row 3"


def test_an_unreachable_hub_says_the_hub_is_needed(monkeypatch):
    import datasets

    def fake_load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'owner/name' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(RecordError, match="ConnectionError.*needs the hub to be reachable"):
        list(read_records("hf://owner/name"))


# --- through the workflow --------------------------------------------------------------------------


def test_the_workflow_reads_a_gz_shard_a_datasets_folder_and_a_mapped_parquet(tmp_path):
    """Real Snakemake on the data rules only (no model): a BOM-prefixed .jsonl.gz and a datasets folder
    as reformat inputs (the folder is a rule input like a file), arena pairs in parquet whose language
    column is called lang; the folder gives what the same records as jsonl give, and a rerun has
    nothing to do."""
    import datasets

    en = (REPO / "resources/demo/chat_en.jsonl").read_bytes()
    (tmp_path / "chat_en.jsonl.gz").write_bytes(gzip.compress(b"\xef\xbb\xbf" + en))
    zh = REPO / "resources/demo/chat_zh.jsonl"
    datasets.Dataset.from_list([json.loads(x) for x in zh.read_text().splitlines() if x.strip()]).save_to_disk(
        str(tmp_path / "zh_saved"))
    pairs = [json.loads(x) for x in (REPO / "resources/demo/arena/labelled.jsonl").read_text().splitlines() if x.strip()]
    renamed = [{("lang" if k == "language" else k): v for k, v in r.items()} for r in pairs]
    pq.write_table(pa.Table.from_pylist(renamed), tmp_path / "pairs.parquet")
    c = small_config(tmp_path)
    c["datasets"]["chat_en"]["splits"]["train"] = [str(tmp_path / "chat_en.jsonl.gz")]
    c["datasets"]["chat_zh"]["splits"]["train"] = [str(tmp_path / "zh_saved")]
    c["arena"]["labelled"] = [str(tmp_path / "pairs.parquet")]
    c["arena"]["fields"] = {"language": "lang"}
    write_config(tmp_path, c)
    data = tmp_path / "results" / "data"
    targets = [str(data / d / "reformatted" / "train.parquet") for d in ("chat_en", "chat_zh")]
    targets.append(str(tmp_path / "results" / "arena" / "demo" / "data" / "labelled.parquet"))

    run_snakemake(tmp_path, *targets)

    assert json.loads((data / "chat_en" / "reformatted" / "train.stats.json").read_text())["written"] == 200
    reformat_files([zh], tmp_path / "zh_from_jsonl.parquet")
    assert pq.read_table(targets[1]).to_pylist() == pq.read_table(tmp_path / "zh_from_jsonl.parquet").to_pylist()
    assert set(pq.read_table(targets[2]).column("language").to_pylist()) == {"en", "zh"}
    assert "Nothing to be done" in run_snakemake(tmp_path, "-n", *targets).stdout
