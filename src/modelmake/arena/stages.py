"""One training stage: pick its data, keep the validation fold out, train, save, predict the held-out fold.

* stage 1: from a base, on the labelled folds except the validation fold;
* stage 2: from the base, on pseudo-labelled pairs (soft targets);
* stage 3: from stage 2, on the labelled folds except the validation fold.

The original trained on every fold, validation included, and reported the leaked score; here a pair
whose id or text is in the validation fold never reaches training (``check_no_leak``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from modelmake.arena.evaluate import metrics
from modelmake.arena.model import TrainSettings, hard_targets, predict, train
from modelmake.arena.template import TemplateSettings, pair_turns
from modelmake.errors import RecordError, UserError
from modelmake.files import write_json, write_parquet

log = logging.getLogger(__name__)


def pair_key(r, swap: bool = False) -> tuple:
    """The pair's text, turn by turn (a string and a one-item list are the same pair)."""
    a, b = (r.response_b, r.response_a) if swap else (r.response_a, r.response_b)
    return tuple(pair_turns(r.prompt, a, b))


def check_no_leak(train_df, valid_df, where: str) -> None:
    """Raise when a validation pair (by id, or by text in either order) is in the training data."""
    ids = set(train_df["id"]) & set(valid_df["id"])
    keys = {pair_key(r) for r in valid_df.itertuples()}
    keys |= {pair_key(r, swap=True) for r in valid_df.itertuples()}
    texts = [r.id for r in train_df.itertuples() if pair_key(r) in keys]
    leaked = sorted(ids | set(texts))
    if leaked:
        raise RecordError(
            f"{len(leaked)} validation pairs are in the training data of {where} (first: {leaked[0]!r}). "
            f"The validation fold must stay held out: remove these pairs from the training sources."
        )


def split_labelled(labelled, valid_fold: int):
    train_df = labelled[labelled["fold"] != valid_fold].reset_index(drop=True)
    valid_df = labelled[labelled["fold"] == valid_fold].reset_index(drop=True)
    if valid_df.empty or train_df.empty:
        raise RecordError(f"fold {valid_fold} leaves {len(train_df)} training and {len(valid_df)} validation "
                          f"pairs; set arena.valid_fold to a fold in use or add records")
    return train_df, valid_df


def training_data(labelled, pseudo: list, valid_fold: int, label_smoothing: float):
    """(train, valid): the labelled training folds, or the pseudo-labelled pairs when given."""
    import pandas as pd

    train_df, valid_df = split_labelled(labelled, valid_fold)
    if pseudo:
        train_df = pd.concat(pseudo, ignore_index=True)[["id", "prompt", "response_a", "response_b", "p_a"]]
    else:
        train_df = train_df.assign(p_a=hard_targets(train_df["winner"], label_smoothing))
    return train_df, valid_df


def run_stage(*, init: str, labelled: str, pseudo: list[str], out: str, ckpt: str, eval_out: str,
              loss_png: str, settings: dict, seed: int, name: str, scale: dict | None = None) -> dict | None:
    """Train the stage on the processes of ``scale`` (``arena.scale``); rank 0 then predicts the
    validation fold and writes the model folder, the predictions and the loss curve, and returns
    the metrics (other ranks return None)."""
    import pandas as pd

    from modelmake import launch
    from modelmake.training import checkpoint_key, plot_loss_curves, save_model_folder

    started = time.time()
    ts = TemplateSettings(**settings["template"])
    s = TrainSettings(**settings["train"])
    labelled_df = pd.read_parquet(labelled)
    train_df, valid_df = training_data(labelled_df, [pd.read_parquet(p) for p in pseudo],
                                       settings["valid_fold"], s.label_smoothing)
    check_no_leak(train_df, valid_df, name)
    inputs = [init, labelled, *pseudo]
    sc = launch.scale_settings(scale, "arena.scale")
    problems = launch.scale_problems(sc, "arena.scale", zero3=False)
    if problems:
        raise UserError("; ".join(problems))
    key = checkpoint_key({"settings": settings, "seed": seed, "scale": launch.recipe(sc)},
                         [*inputs, *([sc["deepspeed"]] if sc["deepspeed"] else [])])
    model, tok, history, counts = train(init, train_df, ckpt, ts, s, seed, key, sc)
    if model is None:
        return None  # not rank 0: rank 0 evaluates and writes

    p_a = predict(model, tok, valid_df, ts)
    p_swap = predict(model, tok, valid_df, ts, swap=True)
    preds = valid_df[["id", "language", "winner"]].assign(p_a=p_a, p_a_swap=p_swap)
    result = {"stage": name, "valid_pairs": len(valid_df), **metrics(preds["p_a"], preds["winner"]),
              "tta": metrics((preds["p_a"] + preds["p_a_swap"]) / 2, preds["winner"])}
    write_parquet(preds, eval_out)
    write_json(Path(eval_out).with_suffix(".json"), result)
    plot_loss_curves(history, loss_png, title=f"arena {name}")
    save_model_folder(out, model, tok, config={**settings, "seed": seed, "scale": sc}, inputs=inputs,
                      counts={**counts, "valid_pairs": len(valid_df)}, started=started,
                      extra={"arena.json": {"template": settings["template"]}, "metrics.json": result})
    log.info("%s: %s", name, result)
    return result
