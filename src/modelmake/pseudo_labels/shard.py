"""Deterministic partitions and shards, by a stable hash of the record id.

A record's partition is ``h(id) mod P`` and its shard within the partition ``(h(id) div P) mod S``,
with ``h`` the first 8 bytes of SHA-256: independent of record order, Python's hash seed and
the machine. Partitions generalise the original script's ``from_percent``/``to_percent``: each machine (or
SLURM allocation) builds any subset of the P partitions.
"""

from __future__ import annotations

import time
from pathlib import Path

from modelmake.chat import plain_messages
from modelmake.files import atomic_open, dumps, stable_hash, write_json


def place(rid: str, partitions: int, shards: int) -> tuple[int, int]:
    """(partition, shard) of a record id."""
    h = stable_hash(rid)
    return h % partitions, (h // partitions) % shards


def shard_name(s: int) -> str:
    return f"shard{s}.jsonl"


def write_partition(parquet: str | Path, out_dir: str | Path, part: int, partitions: int, shards: int) -> dict:
    """Write the shards of one partition as jsonl files in ``out_dir`` plus ``layout.json``."""
    import pyarrow.parquet as pq

    if not 0 <= part < partitions:
        raise ValueError(f"partition {part} is outside 0..{partitions - 1}")
    started = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buckets: list[list[dict]] = [[] for _ in range(shards)]
    for row in pq.read_table(parquet).to_pylist():
        p, s = place(row["id"], partitions, shards)
        if p == part:  # messages in the OpenAI form generation sends: only the fields that are set
            buckets[s].append({**row, "messages": plain_messages(row["messages"])})
    for s, rows in enumerate(buckets):
        with atomic_open(out_dir / shard_name(s)) as f:
            for row in rows:
                f.write(dumps(row) + "\n")
    layout = {"source": str(parquet), "partition": part, "partitions": partitions, "shards": shards,
              "records": [len(b) for b in buckets], "seconds": round(time.time() - started, 3)}
    write_json(out_dir / "layout.json", layout)
    return layout
