"""Distillation data: chat SFT rows and packed multilingual web text, as fixed-length parquet.

Every row has ``input_ids``, ``attention_mask`` and ``labels`` of exactly ``max_len`` tokens
(right-padded with the tokenizer's pad id; padded labels are -100) plus ``source``. Labels are
*not* shifted: ``labels[t] == input_ids[t]`` where the token is trained on, and the model's loss
shifts once (the original shifted here too and so trained on token t+2).

* chat: each conversation through the model's own chat template; only assistant tokens (each
  assistant turn's content and end-of-turn token, ``chat.assistant_mask``: any template, with or
  without ``{% generation %}`` markers) carry labels, user and system turns are -100.
* web: C4-style records per language (any :mod:`modelmake.records` source, e.g. ``.json.gz``
  shards; the text in ``distill.web.text_field``, ``text`` or e.g. ``raw_content``), interleaved
  round-robin by language (a seeded shuffle within each), EOS-joined and packed into ``max_len`` blocks.

The last ``eval_rows`` rows of each source (after a seeded shuffle) are held out.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

from modelmake.chat import assistant_mask
from modelmake.errors import RecordError, UserError
from modelmake.files import provenance_record, write_parquet
from modelmake.records import read_records

log = logging.getLogger(__name__)


def _write(rows: list[dict], out: str | Path, provenance: dict) -> None:
    import pyarrow as pa

    schema = pa.schema([
        ("input_ids", pa.list_(pa.int32())), ("attention_mask", pa.list_(pa.int8())),
        ("labels", pa.list_(pa.int32())), ("source", pa.string()),
    ])
    write_parquet(rows, out, schema=schema, provenance=provenance)


def _pad(ids: list[int], labels: list[int], max_len: int, pad_id: int, source: str) -> dict:
    ids, labels = ids[:max_len], labels[:max_len]
    n = len(ids)
    return {
        "input_ids": ids + [pad_id] * (max_len - n),
        "attention_mask": [1] * n + [0] * (max_len - n),
        "labels": labels + [-100] * (max_len - n),
        "source": source,
    }


def chat_rows(tokenizer, conversations: list[tuple[str, list[dict]]], max_len: int) -> list[dict]:
    """Tokenize conversations with the chat template; labels only on assistant tokens."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the teacher's tokenizer has no chat template; distill.chat needs one")
    rows = []
    for source, messages in conversations:
        ids, amask = assistant_mask(tokenizer, messages)
        if not any(amask[:max_len]):
            continue  # nothing to learn within max_len
        labels = [t if m else -100 for t, m in zip(ids, amask)]
        rows.append(_pad(ids, labels, max_len, tokenizer.pad_token_id, source))
    return rows


def read_web(path: str | Path, text_field: str | None = None) -> list[str]:
    """Texts of a C4-style source (any :mod:`modelmake.records` source: ``.json.gz`` shards, parquet,
    ...) whose text is in ``text_field`` (``distill.web.text_field``: ``text``, or e.g. ``raw_content``);
    bad records are reported as file:line."""
    from modelmake.config import default

    field = text_field or default("distill.web.text_field")
    texts = []
    for where, rec in read_records(path, fields={"text": field}, required=("text",),
                                   config_key={"text": "distill.web.text_field"}):
        if not isinstance(rec["text"], str):
            raise RecordError(f"bad record in {where}: the text field {field!r} must be a string, got "
                              f"{type(rec['text']).__name__}. Fix the record or set distill.web.text_field.")
        texts.append(rec["text"])
    return texts


def interleave(per_language: dict[str, list[str]], seed: int) -> list[tuple[str, str]]:
    """Round-robin over languages (sorted), each shuffled with the seed; (language, text) pairs."""
    rng = random.Random(seed)
    queues = {}
    for lang in sorted(per_language):
        texts = list(per_language[lang])
        rng.shuffle(texts)
        queues[lang] = texts
    out, i = [], 0
    while any(queues.values()):
        for lang in sorted(queues):
            if i < len(queues[lang]):
                out.append((lang, queues[lang][i]))
        i += 1
        if all(i >= len(q) for q in queues.values()):
            break
    return out


def web_rows(tokenizer, texts: list[tuple[str, str]], max_len: int, pack: bool) -> list[dict]:
    """Packed (EOS-joined, cut into max_len blocks) or padded rows; labels = input ids on real tokens."""
    eos = tokenizer.eos_token_id
    rows = []
    if not pack:
        for lang, text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
            rows.append(_pad(ids, ids, max_len, tokenizer.pad_token_id, f"web_{lang}"))
        return rows
    buf, langs = [], []
    for lang, text in texts:
        buf += tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        langs.append(lang)
        while len(buf) >= max_len:
            block, buf = buf[:max_len], buf[max_len:]
            rows.append(_pad(block, block, max_len, tokenizer.pad_token_id, "web_" + "+".join(sorted(set(langs)))))
            langs = [lang]
    return rows


def split_rows(rows: list[dict], eval_rows: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    rows = list(rows)
    rng.shuffle(rows)
    if len(rows) <= eval_rows:
        raise UserError(f"only {len(rows)} rows: fewer than distill.data.eval_rows + 1 ({eval_rows + 1}); "
                        "add data or lower eval_rows")
    return rows[:-eval_rows], rows[-eval_rows:]


def build_chat(parquets: list[str], tokenizer_dir: str, out_train: str, out_eval: str, *, max_len: int,
               eval_rows: int, seed: int, max_rows: int | None = None) -> dict:
    import pandas as pd
    from transformers import AutoTokenizer

    started = time.time()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    conversations = []
    for p in parquets:
        df = pd.read_parquet(p, columns=["messages"])
        conversations += [(Path(p).parent.parent.name, [dict(m) for m in ms]) for ms in df["messages"]]
    rows = chat_rows(tok, conversations, max_len)
    if max_rows:
        rows = random.Random(seed).sample(rows, min(max_rows, len(rows)))
    train, held = split_rows(rows, eval_rows, seed)
    counts = {"conversations": len(conversations), "train": len(train), "eval": len(held),
              "label_tokens": sum(sum(1 for x in r["labels"] if x != -100) for r in train)}
    config = {"max_len": max_len, "eval_rows": eval_rows, "seed": seed, "max_rows": max_rows}
    prov = provenance_record(config=config, inputs=parquets, counts=counts, started=started)
    _write(train, out_train, prov)
    _write(held, out_eval, prov)
    log.info("chat: %s", counts)
    return counts


def build_web(files: dict[str, list[str]], tokenizer_dir: str, out_train: str, out_eval: str, *, max_len: int,
              eval_rows: int, seed: int, pack: bool = True, text_field: str | None = None) -> dict:
    from transformers import AutoTokenizer

    started = time.time()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    per_language = {lang: [t for p in paths for t in read_web(p, text_field)] for lang, paths in files.items()}
    rows = web_rows(tok, interleave(per_language, seed), max_len, pack)
    train, held = split_rows(rows, eval_rows, seed)
    counts = {"texts": {k: len(v) for k, v in per_language.items()}, "train": len(train), "eval": len(held)}
    config = {"max_len": max_len, "eval_rows": eval_rows, "seed": seed, "pack": pack, "files": files,
              "text_field": text_field}
    inputs = [p for paths in files.values() for p in paths]
    prov = provenance_record(config=config, inputs=inputs, counts=counts, started=started)
    _write(train, out_train, prov)
    _write(held, out_eval, prov)
    log.info("web: %s", counts)
    return counts


def load_rows(parquets: list[str]):
    """(input_ids, attention_mask, labels) LongTensors of the given datasets, concatenated in order."""
    import pyarrow.parquet as pq
    import torch

    cols = {"input_ids": [], "attention_mask": [], "labels": []}
    for p in parquets:
        t = pq.read_table(p).to_pydict()
        for k in cols:
            cols[k] += t[k]
    lengths = {len(r) for r in cols["input_ids"]}
    if len(lengths) > 1:
        raise UserError(f"rows of {parquets} have different lengths {sorted(lengths)}: rebuild the data with one max_len")
    return tuple(torch.tensor(cols[k], dtype=torch.long) for k in ("input_ids", "attention_mask", "labels"))
