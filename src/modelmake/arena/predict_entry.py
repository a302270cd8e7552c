#!/usr/bin/env python
"""Arena submission inference: P(response_a wins) for every pair of a parquet or jsonl file.

Copied as ``predict.py`` into each exported submission folder (beside ``arena_template.py``, the
exact input template the model was trained with); needs only torch, transformers and pandas.

  python predict.py --input pairs.parquet --out preds.parquet           # this folder's model
  python predict.py --input pairs.parquet --out preds.parquet --swap    # B read first, swapped back
  python predict.py --ensemble ensemble.json --input ... --out ...      # the two-model ensemble

Input rows (.parquet, .jsonl or .csv) need ``id, prompt, response_a, response_b``: strings, lists of
turns, or JSON-encoded lists as Kaggle's LMSYS files have them (``arena_template.pair_turns``).
The output has ``id, p_a, p_b, winner``.
The ensemble: rows where the first model is confident (|pA - pB| >= confident_margin) keep its
answer; the rest blend it with the second model's answer on the swapped input, by ``weights``.
Weights are stored in float16; on CPU they are computed in float32 (``--dtype`` to change).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from arena_template import TemplateSettings, build_input  # noqa: E402


def read_pairs(path: str):
    import pandas as pd

    if path.endswith(".parquet"):
        return pd.read_parquet(path)
    if path.endswith(".csv"):
        return pd.read_csv(path, keep_default_na=False)
    return pd.read_json(path, lines=True)


def predict(folder: str | Path, df, swap: bool = False, batch_size: int = 32, dtype: str = "auto") -> list[float]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(folder)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float16" if device == "cuda" else "float32"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=getattr(torch, dtype))
    model.to(device).eval()
    ts = TemplateSettings(**json.loads((folder / "arena.json").read_text())["template"])
    a, b = ("response_b", "response_a") if swap else ("response_a", "response_b")
    ids = [build_input(tok, r.prompt, getattr(r, a), getattr(r, b), ts) for r in df.itertuples()]
    out = []
    with torch.no_grad():
        for i in range(0, len(ids), batch_size):
            batch = ids[i: i + batch_size]
            width = max(map(len, batch))
            x = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
            m = torch.zeros((len(batch), width), dtype=torch.long)
            for k, seq in enumerate(batch):
                x[k, : len(seq)] = torch.tensor(seq)
                m[k, : len(seq)] = 1
            probs = model(input_ids=x.to(device), attention_mask=m.to(device)).logits.float().softmax(-1)
            out += probs[:, 1 if swap else 0].tolist()
    return out


def ensemble(spec_path: str | Path, df, batch_size: int = 32, dtype: str = "auto") -> list[float]:
    spec_path = Path(spec_path)
    spec = json.loads(spec_path.read_text())
    first, second = (spec_path.parent / m for m in spec["models"])
    w1, w2 = (w / sum(spec["weights"]) for w in spec["weights"])
    p1 = predict(first, df, batch_size=batch_size, dtype=dtype)
    p2 = predict(second, df, swap=True, batch_size=batch_size, dtype=dtype)
    return [a if abs(2 * a - 1) >= spec["confident_margin"] else w1 * a + w2 * b for a, b in zip(p1, p2)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", required=True, help="pairs: .parquet, .jsonl or .csv")
    ap.add_argument("--out", required=True, help="predictions: .parquet or .csv")
    ap.add_argument("--model", default=str(HERE), help="a submission folder (default: this one)")
    ap.add_argument("--ensemble", help="an ensemble.json (models relative to it, weights, confident_margin)")
    ap.add_argument("--swap", action="store_true", help="read B first and swap the answer back")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"])
    a = ap.parse_args(argv)
    df = read_pairs(a.input)
    if a.ensemble is None and (HERE / "ensemble.json").exists() and a.model == str(HERE):
        a.ensemble = str(HERE / "ensemble.json")
    if a.ensemble:
        p = ensemble(a.ensemble, df, a.batch_size, a.dtype)
    else:
        p = predict(a.model, df, swap=a.swap, batch_size=a.batch_size, dtype=a.dtype)
    out = df[["id"]].copy()
    out["p_a"] = p
    out["p_b"] = 1.0 - out["p_a"]
    out["winner"] = ["model_a" if x >= 0.5 else "model_b" for x in p]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    if a.out.endswith(".csv"):
        out.to_csv(a.out, index=False)
    else:
        out.to_parquet(a.out, index=False)
    print(f"{len(out)} pairs -> {a.out}")


if __name__ == "__main__":
    main()
