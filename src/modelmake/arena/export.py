"""Submission export: fp16 safetensors, tokenizer and an inference entry point that reproduces the
validation predictions; and the two-model ensemble folder.

A folder is built under ``<out>.tmp``; its own ``predict.py`` is then run (a separate process, as a
user would) on the validation fold, and its predictions are compared with the trained model's
(``eval/stage3/{base}.parquet``): the export fails when they differ by more than the tolerance
(fp16 rounding of the weights is all that should differ). ``training.finish_model_folder`` then
writes provenance and, last, ``manifest.json``, and renames the folder into place.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from modelmake.config import default
from modelmake.errors import UserError
from modelmake.files import read_provenance, write_json
from modelmake.training import finish_model_folder, new_model_folder

HERE = Path(__file__).resolve().parent


class ExportError(UserError):
    """The exported submission does not reproduce the validation predictions."""


def copy_entry_point(folder: Path) -> None:
    shutil.copyfile(HERE / "predict_entry.py", folder / "predict.py")
    shutil.copyfile(HERE / "template.py", folder / "arena_template.py")


def run_entry_point(folder: Path, pairs: Path, out: Path, *args: str, timeout_s: float | None = None) -> None:
    """Run the folder's predict.py as a user would; it must finish within ``timeout_s``
    (``arena.export.predict_timeout_s``)."""
    timeout_s = default("arena.export.predict_timeout_s") if timeout_s is None else timeout_s
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the folder stands alone
    try:
        proc = subprocess.run([sys.executable, str(folder / "predict.py"), "--input", str(pairs), "--out", str(out),
                               *args], capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise ExportError(f"{folder}/predict.py did not finish within arena.export.predict_timeout_s={timeout_s:g} "
                          f"s (stopped); raise it for a large validation fold. Its output ends:\n"
                          f"{(e.stderr or b'')[-2000:].decode(errors='replace')}") from None
    if proc.returncode != 0:
        raise ExportError(f"{folder}/predict.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def compare(expected, got, tolerance: float, what: str) -> float:
    import numpy as np

    diff = float(np.max(np.abs(np.asarray(expected, dtype=float) - np.asarray(got, dtype=float))))
    if not diff <= tolerance:
        raise ExportError(f"{what}: predictions differ from the trained model's by {diff:.4g} "
                          f"(more than arena.export.tolerance={tolerance}); the export is broken")
    return diff


def valid_pairs(labelled: str, valid_fold: int, tmp: Path) -> tuple:
    import pandas as pd

    df = pd.read_parquet(labelled)
    valid = df[df["fold"] == valid_fold].reset_index(drop=True)
    path = tmp / "_valid_input.parquet"
    valid.to_parquet(path, index=False)
    return valid, path


def export_model(model_dir: str, labelled: str, valid_fold: int, stage_eval: str, out: str,
                 tolerance: float, predict_timeout_s: float | None = None) -> dict:
    import pandas as pd
    import torch

    from modelmake.arena.evaluate import metrics
    from modelmake.arena.model import load_classifier, load_tokenizer

    started = time.time()
    out = Path(out)
    tmp = new_model_folder(out)
    tok = load_tokenizer(model_dir)
    model = load_classifier(model_dir, tok).to(torch.float16)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.copyfile(Path(model_dir) / "arena.json", tmp / "arena.json")
    copy_entry_point(tmp)

    valid, pairs = valid_pairs(labelled, valid_fold, tmp)
    run_entry_point(tmp, pairs, tmp / "valid_predictions.parquet", timeout_s=predict_timeout_s)
    pairs.unlink()
    got = pd.read_parquet(tmp / "valid_predictions.parquet")
    want = pd.read_parquet(stage_eval)
    if list(got["id"]) != list(want["id"]):
        raise ExportError(f"{stage_eval} and the validation fold hold different pairs; rebuild the stage")
    diff = compare(want["p_a"], got["p_a"], tolerance, str(out))
    from modelmake.arena.evaluate import metrics

    check = {"max_abs_diff_vs_trained": diff, "tolerance": tolerance,
             "metrics": metrics(got["p_a"], valid["winner"]), "dtype": "float16",
             "command": "python predict.py --input <pairs.parquet> --out <preds.parquet>"}
    finish_model_folder(tmp, out, config={"valid_fold": valid_fold, "tolerance": tolerance,
                                          "source": read_provenance(model_dir).get("config")},
                        inputs=[model_dir, labelled, stage_eval], counts=check, started=started,
                        extra={"reproduce.json": check})
    return check


def export_ensemble(models: list[str], weights: list[float], confident_margin: float, labelled: str,
                    valid_fold: int, stage_evals: list[str], out: str, tolerance: float,
                    predict_timeout_s: float | None = None) -> dict:
    """``submission/ensemble/``: ensemble.json (models relative to it), predict.py, and its own
    validation predictions, checked against the ensemble of the trained models' predictions."""
    import pandas as pd

    from modelmake.arena.evaluate import ensemble, metrics

    started = time.time()
    if len(models) != 2 or len(weights) != 2:
        raise ExportError(f"the ensemble takes two models and two weights, got {models} and {weights}; "
                          f"fix arena.ensemble")
    out = Path(out)
    tmp = new_model_folder(out)
    spec = {"models": [os.path.relpath(m, out) for m in models], "weights": weights,
            "confident_margin": confident_margin}
    write_json(tmp / "ensemble.json", spec)
    copy_entry_point(tmp)
    valid, pairs = valid_pairs(labelled, valid_fold, tmp)
    # ensemble.json names the models relative to the folder; <out>.tmp is a sibling of <out>, so the
    # same relative paths work here: run the folder's predict.py as a user would (it finds ensemble.json)
    run_entry_point(tmp, pairs, tmp / "valid_predictions.parquet", timeout_s=predict_timeout_s)
    pairs.unlink()
    got = pd.read_parquet(tmp / "valid_predictions.parquet")
    first, second = (pd.read_parquet(p) for p in stage_evals)
    want = ensemble(first["p_a"], second["p_a_swap"], weights, confident_margin)
    diff = compare(want, got["p_a"], tolerance, str(out))
    confident = sum(abs(2 * a - 1) >= confident_margin for a in first["p_a"])
    check = {"max_abs_diff_vs_trained": diff, "tolerance": tolerance, "confident_rows": int(confident),
             "metrics": metrics(got["p_a"], valid["winner"]),
             "command": "python predict.py --input <pairs.parquet> --out <preds.parquet>"}
    finish_model_folder(tmp, out, config=spec, inputs=[*models, labelled, *stage_evals], counts=check,
                        started=started, extra={"reproduce.json": check})
    return check
