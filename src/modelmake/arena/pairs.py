"""Response pairs: prompts sampled from a pool, answered by each generator, paired A/B.

The prompts become ``{id, messages: [user, assistant placeholder]}`` jsonl, which the shared
``python -m modelmake generate`` answers through a generator's serving pool (journal and resume
included): one answer per record. Every two generators make a pair per prompt; which one is A is
chosen by a seeded hash of (prompt id, generators), so positions carry no signal.
"""

from __future__ import annotations

import itertools
import random
import time

from modelmake.errors import RecordError
from modelmake.files import atomic_open, dumps, provenance_record, read_jsonl, stable_hash, write_parquet
from modelmake.records import read_records


def sample_prompts(pool: str, n: int, seed: int, out: str, fields: dict[str, str] | None = None) -> int:
    """``n`` prompts of the pool (any :mod:`modelmake.records` source, ``{id, prompt, language}``,
    other names mapped by ``fields``: ``arena.response_pairs.fields``), chosen with the seed."""
    rows = []
    for where, rec in read_records(pool, fields=fields, required=("id", "prompt"),
                                   config_key="arena.response_pairs.fields"):
        if not (isinstance(rec.get("id"), str) and isinstance(rec.get("prompt"), str)):
            raise RecordError(f"bad record in {where}: needs string 'id' and 'prompt'. Fix the line.")
        rows.append(rec)
    if n > len(rows):
        raise RecordError(f"arena.response_pairs.prompts={n} but {pool} holds {len(rows)} prompts; "
                          f"lower the number or add prompts")
    picked = sorted(random.Random(seed).sample(range(len(rows)), n))
    with atomic_open(out) as f:
        for i in picked:
            r = rows[i]
            f.write(dumps({"id": r["id"], "language": r.get("language", ""), "messages": [
                {"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": ""}]}) + "\n")
    return n


def a_first(seed: int, rid: str, g1: str, g2: str) -> bool:
    return (stable_hash(f"{seed}:{rid}:{g1}:{g2}") >> 56) % 2 == 0  # the parity of the hash's first byte


def make_pairs(prompts: str, answers: dict[str, str], seed: int, out: str) -> dict:
    """One A/B pair per prompt and generator pair, from answers that succeeded and are not empty."""
    import pandas as pd

    started = time.time()
    if len(answers) < 2:
        raise RecordError(f"response pairs need two or more generators, got {sorted(answers)}; "
                          f"list more under arena.response_pairs.generators")
    prompt_rows = {r["id"]: r for r in read_jsonl(prompts)}
    text = {}
    for gen, path in answers.items():
        for r in read_jsonl(path):
            if r.get("messages") and r["messages"][-1]["role"] == "assistant" and r["messages"][-1]["content"].strip():
                text[(gen, r["id"])] = r["messages"][-1]["content"].strip()
    rows, skipped = [], 0
    for rid, p in prompt_rows.items():
        for g1, g2 in itertools.combinations(sorted(answers), 2):
            if (g1, rid) not in text or (g2, rid) not in text:
                skipped += 1
                continue
            a, b = (g1, g2) if a_first(seed, rid, g1, g2) else (g2, g1)
            rows.append({"id": f"{rid}:{a}:{b}", "prompt": p["messages"][0]["content"],
                         "response_a": text[(a, rid)], "response_b": text[(b, rid)],
                         "language": p.get("language", ""), "model_a": a, "model_b": b})
    if not rows:
        raise RecordError(f"no response pair could be made from {', '.join(answers.values())}: "
                          f"every answer failed or is empty; read the generate logs")
    df = pd.DataFrame(rows)
    counts = {"pairs": len(df), "skipped": skipped, "generators": sorted(answers)}
    prov = provenance_record(config={"seed": seed}, inputs=[prompts, *answers.values()], counts=counts,
                             started=started)
    write_parquet(df, out, provenance=prov)
    return counts
