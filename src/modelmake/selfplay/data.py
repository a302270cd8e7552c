"""Self-play data: single-turn prompts, generation fractions, and the KTO dataset of an iteration.

* :func:`single_turn`: reformatted ``{id, messages}`` parquet (UltraChat-200k, ShareGPT, ...; see
  :mod:`modelmake.reformat`) -> ``{id, prompt, real}`` parquet: the first user turn and the
  assistant answer that follows it (the gold answer). Conversations without one (or whose first
  answer is a tool call) are counted and left out.
* :func:`write_fractions`: that parquet -> ``frac{k}.jsonl`` files of ``frac_len`` prompts each
  (``frac_len: 0``: one fraction), each record ``{id, messages: [user, assistant(gold)]}``: the
  shape :func:`modelmake.generate.generate_shard` reads; it re-generates the one assistant turn.
* :func:`to_kto`: the generated fractions of a split -> a KTO parquet: per id the real answer as a
  labelled positive (``label`` true) next to the generated one as unlabelled (``label`` false),
  pairs in a seeded shuffled order so that every even batch holds as many of each.
"""

from __future__ import annotations

import time
from pathlib import Path

from modelmake.chat import is_tool_call, read_conversations
from modelmake.errors import RecordError, UserError
from modelmake.files import (
    atomic_open, digest, dumps, provenance_record, read_jsonl, sha256_file, write_json, write_parquet,
)

FRACTION = "frac{k}.jsonl"


def single_turn(reformatted: str | Path, out: str | Path, *, config: dict | None = None) -> dict:
    """Write ``{id, prompt, real}`` for every conversation that opens with a user turn answered by
    the assistant; return the counts."""
    import pandas as pd

    started = time.time()
    conversations = read_conversations(reformatted)
    rows, skipped = [], 0
    for rid, messages in conversations:
        turns = [m for m in messages if m["role"] != "system"]
        if len(turns) < 2 or turns[0]["role"] != "user" or turns[1]["role"] != "assistant" \
                or is_tool_call(turns[1]) or not turns[0]["content"].strip() or not turns[1]["content"].strip():
            skipped += 1  # no answer in words (none, or a tool call) to the first question
            continue
        rows.append({"id": rid, "prompt": turns[0]["content"], "real": turns[1]["content"]})
    if not rows:
        raise RecordError(
            f"{reformatted}: no conversation opens with a user turn and an assistant answer; "
            f"check selfplay.dataset and its splits in config.yaml"
        )
    counts = {"conversations": len(conversations), "prompts": len(rows), "skipped": skipped}
    write_parquet(pd.DataFrame(rows, columns=["id", "prompt", "real"]), out,
                  provenance=provenance_record(config=config or {}, inputs=[reformatted], counts=counts,
                                               started=started))
    return counts


def fraction_bounds(n: int, frac_len: int) -> list[tuple[int, int]]:
    """[start, end) of each fraction of ``n`` prompts; ``frac_len`` 0 means one fraction."""
    if frac_len < 0:
        raise UserError(f"selfplay.frac_len: {frac_len} must be 0 (all prompts) or positive")
    if frac_len == 0 or n == 0:
        return [(0, n)]
    return [(s, min(n, s + frac_len)) for s in range(0, n, frac_len)]


def write_fractions(single: str | Path, out_dir: str | Path, frac_len: int) -> list[Path]:
    """Split the prompts, in file order, into ``out_dir/frac{k}.jsonl``; a layout.json says how."""
    import pandas as pd

    df = pd.read_parquet(single)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, (a, b) in enumerate(fraction_bounds(len(df), frac_len)):
        path = out_dir / FRACTION.format(k=k)
        with atomic_open(path) as f:
            for row in df.iloc[a:b].itertuples(index=False):
                f.write(dumps({"id": row.id, "messages": [
                    {"role": "user", "content": row.prompt}, {"role": "assistant", "content": row.real},
                ]}) + "\n")
        paths.append(path)
    write_json(out_dir / "layout.json", {"prompts": len(df), "frac_len": frac_len, "fractions": len(paths),
                                         "source": str(single), "source_sha256": sha256_file(single)})
    return paths


def _order_key(seed: int, rid: str) -> str:
    return digest(f"{seed}:{rid}", None)


def to_kto(single: str | Path, fractions: list[str | Path], out: str | Path, *, seed: int = 0,
           config: dict | None = None) -> dict:
    """Pair every prompt's real answer (label true) with its generated one (label false).

    Columns: ``id``, ``prompt`` and ``completion`` in conversational form (lists of messages, so the
    trainer applies the model's own chat template), ``label``, ``source`` (real | generated).
    Prompts whose generation failed or came back empty are left out (counted); an id generated
    twice or not among the prompts is an error (the fractions are not of this split).
    """
    import pandas as pd

    started = time.time()
    prompts = pd.read_parquet(single)
    real = dict(zip(prompts["id"], prompts["real"]))
    text = dict(zip(prompts["id"], prompts["prompt"]))
    generated: dict[str, str] = {}
    failed = empty = 0
    for path in fractions:
        for rec in read_jsonl(path):
            rid = rec["id"]
            if rid not in real:
                raise RecordError(f"{path}: id {rid!r} is not a prompt of {single}; rebuild the fractions")
            if rid in generated:
                raise RecordError(f"{path}: id {rid!r} was generated twice; rebuild the generation fractions")
            if rec.get("error") or not rec.get("messages"):
                failed += 1
                continue
            answer = next((m["content"] for m in reversed(rec["messages"]) if m["role"] == "assistant"), "")
            if not answer.strip():
                empty += 1
                continue
            generated[rid] = answer
    ids = sorted(generated, key=lambda r: _order_key(seed, r))
    rows = []
    for rid in ids:
        prompt = [{"role": "user", "content": text[rid]}]
        rows.append({"id": rid, "prompt": prompt, "completion": [{"role": "assistant", "content": real[rid]}],
                     "label": True, "source": "real"})
        rows.append({"id": rid, "prompt": prompt,
                     "completion": [{"role": "assistant", "content": generated[rid]}],
                     "label": False, "source": "generated"})
    if not rows:
        raise RecordError(f"no generated answer to pair with in {len(fractions)} fraction(s) of {single}")
    counts = {"prompts": len(prompts), "pairs": len(ids), "failed": failed, "empty": empty,
              "missing": len(prompts) - len(ids) - failed - empty,
              "identical": sum(generated[r].strip() == real[r].strip() for r in ids)}
    write_parquet(pd.DataFrame(rows), out, provenance=provenance_record(
        config=config or {}, inputs=[single, *fractions], counts=counts, started=started))
    return counts
