"""``python -m modelmake shard`` and ``python -m modelmake merge``: argument wiring for the
pseudo-label rules (generation is the shared ``modelmake generate``)."""

from __future__ import annotations

import json
import logging

log = logging.getLogger(__name__)


def cmd_shard(a) -> None:
    from modelmake.pseudo_labels.shard import write_partition

    layout = write_partition(a.parquet, a.out, a.part, a.partitions, a.shards)
    log.info("partition %d: %s records per shard", a.part, layout["records"])


def cmd_merge(a) -> None:
    from modelmake.pseudo_labels.merge import merge_shards

    stats = merge_shards(a.shards, a.out, a.stats, a.plot, config=json.loads(a.config))
    log.info("merged: %d ok, %d failed, %d tokens", stats["ok"], stats["failed"], stats["completion_tokens"])


def add_commands(sub) -> None:
    p = sub.add_parser("shard", help="write one partition's shards")
    p.add_argument("parquet")
    p.add_argument("--out", required=True)
    p.add_argument("--part", type=int, required=True)
    p.add_argument("--partitions", type=int, required=True)
    p.add_argument("--shards", type=int, required=True)
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser("merge", help="pseudo-label shards -> parquet, stats and plot")
    p.add_argument("shards", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--stats", required=True)
    p.add_argument("--plot", required=True)
    p.add_argument("--config", default="{}", help="JSON of the config slice to record")
    p.set_defaults(func=cmd_merge)
