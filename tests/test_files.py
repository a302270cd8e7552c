"""modelmake.files, the one owner of artifact I/O: atomic file and folder writes with unique
temporary names, parquet with provenance, figures, digests (users' records: test_records.py)."""

from __future__ import annotations

import hashlib
import json

import pytest

from modelmake.files import (
    atomic_folder, atomic_open, digest, provenance_record, pyplot, read_provenance,
    save_figure, stable_hash, write_parquet, write_provenance,
)


# --- atomic writes with unique temporary names ------------------------------------------------------


def test_two_writers_of_one_path_get_different_temporary_files(tmp_path):
    target = tmp_path / "out.txt"
    with atomic_open(target) as first, atomic_open(target) as second:
        first.write("first")
        second.write("second")
        temporaries = sorted(p.name for p in tmp_path.iterdir())
        assert len(temporaries) == 2 and all(n.startswith(".out.txt.") and n.endswith(".tmp") for n in temporaries)
    assert target.read_text() == "first"  # the last one closed wins, whole
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_a_failed_write_leaves_the_target_as_it_was_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("before")
    with pytest.raises(RuntimeError), atomic_open(target) as f:
        f.write("half")
        raise RuntimeError("killed")
    assert target.read_text() == "before"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    out = tmp_path / "model"
    with atomic_folder(out) as tmp:
        (tmp / "a.txt").write_text("one")
    with pytest.raises(RuntimeError), atomic_folder(out) as tmp:
        (tmp / "b.txt").write_text("two")
        raise RuntimeError("killed")
    assert [p.name for p in out.iterdir()] == ["a.txt"]
    with atomic_folder(out) as first, atomic_folder(out) as second:
        assert first != second
        (first / "c.txt").write_text("three")
        (second / "c.txt").write_text("three")
    assert [p.name for p in out.iterdir()] == ["c.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


# --- parquet with provenance -------------------------------------------------------------------------


def test_parquet_round_trips_with_its_provenance(tmp_path):
    import datasets
    import pandas as pd

    source = tmp_path / "in.jsonl"
    source.write_text('{"id": "a"}\n', encoding="utf-8")
    prov = provenance_record(config={"seed": 3}, inputs=[source], counts={"rows": 2}, started=1.0)
    df = pd.DataFrame({"id": ["a", "b"], "n": [1, 2]})
    out = write_parquet(df, tmp_path / "t.parquet", provenance=prov)

    assert read_provenance(out) == json.loads(json.dumps(prov))
    assert read_provenance(out)["inputs"] == {str(source): hashlib.sha256(source.read_bytes()).hexdigest()}
    pd.testing.assert_frame_equal(pd.read_parquet(out), df)
    ds = datasets.load_dataset("parquet", data_files=str(out), cache_dir=str(tmp_path / "hf"))["train"]
    assert ds.to_list() == [{"id": "a", "n": 1}, {"id": "b", "n": 2}]


def test_parquet_from_rows_with_a_schema(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()), ("tokens", pa.list_(pa.int32()))])
    out = write_parquet([], tmp_path / "empty.parquet", schema=schema, provenance={"counts": {"rows": 0}})
    assert pq.read_schema(out).field("tokens").type == pa.list_(pa.int32())
    assert read_provenance(out) == {"counts": {"rows": 0}}
    write_parquet([{"id": "a", "tokens": [1, 2]}], out, schema=schema)
    assert pq.read_table(out).to_pylist() == [{"id": "a", "tokens": [1, 2]}]
    assert read_provenance(out) == {}


def test_a_failed_parquet_write_leaves_the_target_as_it_was_and_no_temporary(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    out = write_parquet([{"id": "a"}], tmp_path / "t.parquet", provenance={"run": 1})
    before = out.read_bytes()

    def dies_half_way(table, where, **kwargs):
        where.write(b"PAR1 half a file")
        raise OSError("no space left on device")

    monkeypatch.setattr(pq, "write_table", dies_half_way)
    with pytest.raises(OSError, match="no space"):
        write_parquet([{"id": "b"}], out, provenance={"run": 2})
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


def test_provenance_of_a_folder_and_of_a_file_beside_its_sidecar(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    write_provenance(folder, config={"lr": 0.1}, counts={"steps": 3})
    assert read_provenance(folder)["config"] == {"lr": 0.1}
    assert read_provenance(folder)["counts"] == {"steps": 3}
    other = tmp_path / "out.jsonl"
    other.write_text("{}\n")
    assert read_provenance(other) == {}
    write_provenance(other, config={"k": 1})
    assert (tmp_path / "out.jsonl.provenance.json").is_file()
    assert read_provenance(other)["config"] == {"k": 1}
    with pytest.raises(FileNotFoundError):
        read_provenance(tmp_path / "missing.parquet")


# --- figures and digests ---------------------------------------------------------------------------------


def test_a_figure_is_saved_as_png_and_closed(tmp_path):
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png = save_figure(fig, tmp_path / "plots" / "curve.png")
    assert png.read_bytes().startswith(b"\x89PNG")
    assert fig.number not in plt.get_fignums()
    assert [p.name for p in png.parent.iterdir()] == ["curve.png"]


def test_digests_ignore_key_order_and_match_their_definitions():
    assert digest({"b": 1, "a": [1, 2]}) == digest({"a": [1, 2], "b": 1})
    assert digest({"a": 1}, None) == hashlib.sha256(json.dumps({"a": 1}, sort_keys=True).encode()).hexdigest()
    assert digest("héllo") == digest("héllo".encode()) == hashlib.sha256("héllo".encode()).hexdigest()[:16]
    assert stable_hash("rid-1") == int.from_bytes(hashlib.sha256(b"rid-1").digest()[:8], "big")
