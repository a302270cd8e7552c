"""modelmake.pseudo_labels.shard: deterministic (partition, shard) placement by a stable hash of the id."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from modelmake.pseudo_labels.shard import place, shard_name, write_partition

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
])


def make_rows(n: int) -> list[dict]:
    return [{"id": f"rec-{i:04d}", "messages": [{"role": "user", "content": f"question {i}"},
                                                 {"role": "assistant", "content": f"answer {i}"}]}
            for i in range(n)]


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)
    return path


def read_shards(folder: Path, shards: int) -> list[list[dict]]:
    out = []
    for s in range(shards):
        text = (folder / shard_name(s)).read_text(encoding="utf-8")
        out.append([json.loads(line) for line in text.splitlines() if line.strip()])
    return out


def write_all(parquet: Path, root: Path, partitions: int, shards: int) -> dict[tuple[int, int], list[dict]]:
    """Every partition written to root/part<p>; rows by (partition, shard)."""
    placed = {}
    for p in range(partitions):
        write_partition(parquet, root / f"part{p}", p, partitions, shards)
        for s, rows in enumerate(read_shards(root / f"part{p}", shards)):
            placed[(p, s)] = rows
    return placed


ROWS = make_rows(300)
IDS = [r["id"] for r in ROWS]


# place(id, 4, 3) computed by hand: h = first 8 bytes of sha256(id), big-endian; (h % 4, h // 4 % 3)
GOLDEN = [(3, 2), (2, 2), (0, 1), (2, 2)]


def test_placement_is_deterministic_and_in_range():
    for rid in IDS:
        p, s = place(rid, 4, 3)
        assert (p, s) == place(rid, 4, 3)
        assert 0 <= p < 4 and 0 <= s < 3
    # Golden values: placement must not depend on Python's hash seed, the machine or the version,
    # or a resumed build on another machine would put records in other shards.
    assert [place(rid, 4, 3) for rid in ("en-0000", "en-0001", "zh-0042", "h-802c07c64a696eb4")] == GOLDEN


def test_placement_spreads_records_over_all_partitions_and_shards():
    counts = Counter(place(rid, 3, 4) for rid in IDS)
    assert set(counts) == {(p, s) for p in range(3) for s in range(4)}
    assert min(counts.values()) >= 10  # 300 records over 12 cells: about 25 each


def test_placement_is_independent_of_record_order(tmp_path):
    shuffled = ROWS[:]
    random.Random(1).shuffle(shuffled)
    ordered = write_all(write_parquet(tmp_path / "a.parquet", ROWS), tmp_path / "a", 3, 2)
    reordered = write_all(write_parquet(tmp_path / "b.parquet", shuffled), tmp_path / "b", 3, 2)
    assert ordered.keys() == reordered.keys()
    for cell in ordered:
        assert sorted(r["id"] for r in ordered[cell]) == sorted(r["id"] for r in reordered[cell])


def test_every_record_lands_in_exactly_one_partition_and_shard(tmp_path):
    placed = write_all(write_parquet(tmp_path / "in.parquet", ROWS), tmp_path / "out", 3, 4)
    seen = Counter(r["id"] for rows in placed.values() for r in rows)
    assert set(seen) == set(IDS)
    assert all(n == 1 for n in seen.values()), [i for i, n in seen.items() if n > 1]
    for (p, s), rows in placed.items():
        for r in rows:
            assert place(r["id"], 3, 4) == (p, s)


def test_shards_hold_the_records_unchanged(tmp_path):
    placed = write_all(write_parquet(tmp_path / "in.parquet", ROWS), tmp_path / "out", 2, 2)
    by_id = {r["id"]: r for rows in placed.values() for r in rows}
    assert [by_id[i] for i in IDS] == ROWS


def test_changing_the_shard_count_replaces_records_but_covers_each_once(tmp_path):
    parquet = write_parquet(tmp_path / "in.parquet", ROWS)
    two = write_all(parquet, tmp_path / "s2", 2, 2)
    five = write_all(parquet, tmp_path / "s5", 2, 5)

    def where(placed):
        loc = {}
        for cell, rows in placed.items():
            for r in rows:
                assert r["id"] not in loc, f"{r['id']} in {loc.get(r['id'])} and {cell}"
                loc[r["id"]] = cell
        return loc

    loc2, loc5 = where(two), where(five)
    assert set(loc2) == set(loc5) == set(IDS)
    assert any(loc2[i][1] != loc5[i][1] for i in IDS)  # shards were re-placed
    # the partition is h mod P only: changing the shard count keeps records in their partition
    assert all(loc2[i][0] == loc5[i][0] for i in IDS)


def test_every_shard_file_exists_even_when_empty(tmp_path):
    parquet = write_parquet(tmp_path / "in.parquet", make_rows(2))
    layout = write_partition(parquet, tmp_path / "out", 0, 1, 8)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [shard_name(s) for s in range(8)] + ["layout.json", "provenance.json"])
    assert sum(layout["records"]) == 2
    from modelmake.files import read_provenance, sha256_file

    prov = read_provenance(tmp_path / "out")  # the folder's record: what its shards came from
    assert prov["inputs"] == {str(parquet): sha256_file(parquet)} and prov["counts"]["records"] == 2
    assert layout["records"].count(0) >= 6


def test_layout_json_describes_the_partition(tmp_path):
    parquet = write_parquet(tmp_path / "in.parquet", ROWS)
    out = tmp_path / "part1"
    returned = write_partition(parquet, out, 1, 3, 2)
    layout = json.loads((out / "layout.json").read_text())
    assert layout == returned
    assert set(layout) == {"source", "partition", "partitions", "shards", "records", "seconds"}
    assert layout["source"] == str(parquet)
    assert (layout["partition"], layout["partitions"], layout["shards"]) == (1, 3, 2)
    assert layout["records"] == [len(rows) for rows in read_shards(out, 2)]
    assert sum(layout["records"]) == sum(1 for i in IDS if place(i, 3, 2)[0] == 1) > 0
    assert layout["seconds"] >= 0


@pytest.mark.parametrize("part", [-1, 3])
def test_partition_outside_range_is_refused(tmp_path, part):
    parquet = write_parquet(tmp_path / "in.parquet", ROWS)
    with pytest.raises(ValueError, match="outside 0..2"):
        write_partition(parquet, tmp_path / "out", part, 3, 2)
    assert not (tmp_path / "out").exists()
