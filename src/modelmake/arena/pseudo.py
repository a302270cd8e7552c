"""Soft pseudo-labels: each model's eval-only predictions (original and swapped input), merged by weight.

Each stage-1 model predicts every unlabelled pair twice, as given and with A and B swapped (the
swapped answer is swapped back), and the two are averaged: a separate file per model. The merge
takes a weighted mean of the models' P(A wins) (weights from config, normalised), and drops pairs
whose |pA - pB| is below the margin: the ensemble cannot tell, so the pair would teach noise.
"""

from __future__ import annotations

import time
from pathlib import Path

from modelmake.errors import ConfigError, RecordError
from modelmake.files import provenance_record, write_json, write_parquet


def predict_pairs(model_dir: str, pairs: str, out: str, batch_size: int = 32) -> dict:
    import pandas as pd
    import torch

    from modelmake.arena.model import load_classifier, load_tokenizer, predict
    from modelmake.arena.template import TemplateSettings
    from modelmake.files import read_json

    started = time.time()
    ts = TemplateSettings(**read_json(Path(model_dir) / "arena.json")["template"])
    tok = load_tokenizer(model_dir)
    model = load_classifier(model_dir, tok)
    if torch.cuda.is_available():  # the rule's gpu resource (arena.scale.gpu) gave this job one
        model.to("cuda")
    df = pd.read_parquet(pairs)
    p_orig = predict(model, tok, df, ts, batch_size)
    p_swap = predict(model, tok, df, ts, batch_size, swap=True)
    preds = pd.DataFrame({"id": df["id"], "p_a_orig": p_orig, "p_a_swap": p_swap})
    preds["p_a"] = (preds["p_a_orig"] + preds["p_a_swap"]) / 2
    counts = {"rows": len(preds), "mean_p_a": round(float(preds["p_a"].mean()), 4),
              "swap_agreement": round(float(((preds["p_a_orig"] >= .5) == (preds["p_a_swap"] >= .5)).mean()), 4)}
    prov = provenance_record(config={"model": model_dir}, inputs=[model_dir, pairs], counts=counts,
                             started=started)
    write_parquet(preds, out, provenance=prov)
    return counts


def merge_soft_labels(pairs_df, predictions: dict, weights: dict, margin: float):
    """(kept pairs with p_a/p_b soft labels, stats). ``predictions`` maps a model name to its frame."""
    missing = sorted(set(predictions) - set(weights))
    if missing:
        raise ConfigError(f"arena.pseudo.weights: no weight for {', '.join(missing)}; give every base a weight")
    total = sum(weights[m] for m in predictions)
    if total <= 0:
        raise ConfigError("arena.pseudo.weights: the weights of the bases sum to 0; give a positive weight")
    blend = None
    for name, df in sorted(predictions.items()):
        p = df.set_index("id")["p_a"].reindex(pairs_df["id"])
        if p.isna().any():
            raise RecordError(f"the predictions of {name} miss {int(p.isna().sum())} pairs "
                              f"(first: {p[p.isna()].index[0]!r}); rebuild them")
        term = p.to_numpy() * (weights[name] / total)
        blend = term if blend is None else blend + term
    out = pairs_df.copy()
    out["p_a"] = blend
    out["p_b"] = 1.0 - blend
    keep = (out["p_a"] - out["p_b"]).abs() >= margin
    stats = {"pairs": len(out), "kept": int(keep.sum()), "dropped_below_margin": int((~keep).sum()),
             "margin": margin, "weights": {m: weights[m] / total for m in sorted(predictions)},
             "mean_p_a_kept": round(float(out.loc[keep, "p_a"].mean()), 4) if keep.any() else None}
    return out[keep].reset_index(drop=True), stats


def merge(pairs: str, predictions: dict[str, str], weights: dict, margin: float, out: str, stats_path: str) -> dict:
    import pandas as pd

    started = time.time()
    kept, stats = merge_soft_labels(pd.read_parquet(pairs),
                                    {m: pd.read_parquet(p) for m, p in predictions.items()}, weights, margin)
    if kept.empty:
        raise RecordError(f"no pseudo-labelled pair of {pairs} passes arena.pseudo.margin={margin}; lower the margin")
    prov = provenance_record(config={"weights": weights, "margin": margin},
                             inputs=[pairs, *predictions.values()], counts=stats, started=started)
    write_parquet(kept, out, provenance=prov)
    write_json(stats_path, stats)
    return stats
