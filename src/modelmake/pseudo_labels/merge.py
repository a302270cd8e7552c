"""Merge pseudo-label shards into one parquet dataset, a stats JSON and a plot."""

from __future__ import annotations

import re
import time
from pathlib import Path

from modelmake.chat import messages_type
from modelmake.files import provenance_record, pyplot, read_jsonl, save_figure, write_json, write_parquet

SHARD_FILE = re.compile(r"shard(\d+)\.jsonl")


def merge_shards(
    shards: list[str | Path], out: str | Path, stats_path: str | Path, plot_path: str | Path,
    *, config: dict,
) -> dict:
    """Successful records of every shard -> parquet (id, messages, teacher, tokens, source shard).

    ``shards``: shard files, or folders of them (a generation job of several shards writes its group's
    folder ``part{p}/group{g}``: its ``shard<N>.jsonl`` files are read in shard order).

    Failed records and dropped ones (``pseudo_labels.ending_user_turn: drop``) are counted in the
    stats, not written. The parquet's schema metadata holds the
    provenance (config slice, code version, input hashes, counts, wall time), so the dataset carries
    what made it.
    """
    import pyarrow as pa

    started = time.time()
    shards = [str(p) for p in shard_files(shards)]
    rows, failed, dropped, per_shard = [], 0, 0, []
    for path in map(str, shards):
        recs = read_jsonl(path)
        n_ok = n_dropped = 0
        for r in recs:
            if "error" in r:
                failed += 1
                continue
            if "dropped" in r:
                n_dropped += 1
                continue
            g = r["generation"]
            rows.append({
                "id": r["id"], "messages": r["messages"], "teacher": g["model"],
                "prompt_tokens": g["usage"]["prompt_tokens"],
                "completion_tokens": g["usage"]["completion_tokens"],
                "turns": g["turns"], "truncated": g["truncated"], "shard": path,
            })
            n_ok += 1
        dropped += n_dropped
        per_shard.append({"shard": path, "records": len(recs), "ok": n_ok, "dropped": n_dropped})
    schema = pa.schema([
        ("id", pa.string()),
        ("messages", messages_type()),
        ("teacher", pa.string()), ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
        ("turns", pa.int64()), ("truncated", pa.bool_()), ("shard", pa.string()),
    ])
    tokens = [r["completion_tokens"] for r in rows]
    counts = {
        "records": len(rows) + failed + dropped, "ok": len(rows), "failed": failed, "dropped": dropped,
        "completion_tokens": sum(tokens), "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
        "truncated": sum(r["truncated"] for r in rows),
    }
    write_parquet(rows, out, schema=schema,
                  provenance=provenance_record(config=config, inputs=shards, counts=counts, started=started))
    stats = {**counts, "shards": per_shard, "seconds": round(time.time() - started, 3)}
    write_json(stats_path, stats)
    plot_lengths(tokens, per_shard, plot_path)
    return stats


def shard_files(paths: list[str | Path]) -> list[Path]:
    """``paths`` with each folder replaced by its shard files (``shard<N>.jsonl``, by N)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = [(int(m[1]), f) for f in p.iterdir() if (m := SHARD_FILE.fullmatch(f.name))]
            out += [f for _, f in sorted(found)]
        else:
            out.append(p)
    return out


def plot_lengths(tokens: list[int], per_shard: list[dict], path: str | Path) -> None:
    fig, (a, b) = pyplot().subplots(1, 2, figsize=(10, 3.5))
    a.hist(tokens or [0], bins=30, color="#4c72b0")
    a.set_xlabel("generated tokens per conversation")
    a.set_ylabel("conversations")
    b.bar(range(len(per_shard)), [s["ok"] for s in per_shard], color="#55a868", label="ok")
    failed = [s["records"] - s["ok"] - s["dropped"] for s in per_shard]
    b.bar(range(len(per_shard)), failed, bottom=[s["ok"] for s in per_shard], color="#c44e52", label="failed")
    if any(s["dropped"] for s in per_shard):
        b.bar(range(len(per_shard)), [s["dropped"] for s in per_shard],
              bottom=[s["ok"] + f for s, f in zip(per_shard, failed)], color="#8c8c8c", label="dropped")
    b.set_xlabel("shard")
    b.set_ylabel("records")
    if len(per_shard) <= 32:
        # part{p}/shard{s}, also for a job per group (part{p}/group{g}/shard{s}: the group left out)
        names = ["/".join([p for p in Path(s["shard"]).with_suffix("").parts[-3:] if not p.startswith("group")][-2:])
                 for s in per_shard]
        b.set_xticks(range(len(per_shard)), names, rotation=90 if len(per_shard) > 8 else 0, fontsize=8)
    b.set_ylim(0, max([s["records"] for s in per_shard] + [1]) * 1.25)
    b.legend(loc="upper right", ncols=2)
    fig.tight_layout()
    save_figure(fig, path)
