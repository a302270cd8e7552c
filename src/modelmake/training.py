"""What every training pipeline shares: seeding, resuming, saving a model folder, loss curves.

Pipelines (router, selfplay, arena, distill) train with TRL / transformers / plain torch; this
module is the one place for the conventions around that:

* ``seed_everything(seed)`` before building data loaders and models;
* ``resume_checkpoint(output_dir)``: the last complete ``checkpoint-N`` folder a killed run left
  (pass it to ``trainer.train(resume_from_checkpoint=...)``), or None;
* ``save_model_folder(out, model, tokenizer, ...)``: a HF ``save_pretrained`` folder written under a
  temporary name, with ``provenance.json`` and, last, ``manifest.json`` (file sizes and hashes), then
  renamed into place: a half-written model folder never looks complete;
* ``plot_loss_curves(log_history, png)``: the curves people would rather look at than read.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

from modelmake.files import sha256_file, write_json, write_provenance

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch; deterministic kernels so a rerun gives the same weights.

    Deterministic mode would also fill every new ``torch.empty`` with NaN (a debugging aid that
    catches reads of uninitialised memory; it does not change results). That fill cost the router's
    SFT a third of its time on CPU (30 steps under cProfile: 15.7 s with it, 10.7 s without; TRL's
    chunked log-prob kernel allocates per step), so it is off.
    """
    import numpy as np
    import torch
    import torch.utils.deterministic

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False


def resume_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest complete ``checkpoint-N`` under ``output_dir`` (a Trainer's output), or None.

    A checkpoint counts when its ``trainer_state.json`` exists: the Trainer writes that file after
    the weights and optimizer state, so a checkpoint cut short by a kill is skipped.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    done = [
        p for p in folder.glob("checkpoint-*")
        if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").exists()
    ]
    if not done:
        return None
    last = max(done, key=lambda p: int(p.name.split("-")[-1]))
    log.info("resuming from %s", last)
    return str(last)


def save_model_folder(
    out: str | os.PathLike,
    model: Any,
    tokenizer: Any = None,
    *,
    config: Any,
    inputs: Iterable[str | os.PathLike] = (),
    counts: dict | None = None,
    started: float | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save a HF model folder atomically: ``<out>.tmp`` then rename; ``manifest.json`` written last.

    ``extra`` maps file names to JSON objects written into the folder too (metrics, label maps).
    """
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for name, obj in (extra or {}).items():
        write_json(tmp / name, obj)
    write_provenance(tmp, config=config, inputs=inputs, counts=counts, started=started or time.time())
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    write_json(tmp / MANIFEST, {
        str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files
    })
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def plot_loss_curves(log_history: list[dict], png: str | os.PathLike, title: str = "training") -> None:
    """Plot every ``*loss*`` series of a Trainer's ``state.log_history`` (or any list of dicts
    with a ``step`` key) against the step, into one PNG."""
    from modelmake.files import pyplot, save_figure

    series: dict[str, tuple[list, list]] = {}
    for row in log_history:
        for key, value in row.items():
            if "loss" in key and isinstance(value, (int, float)) and "step" in row:
                xs, ys = series.setdefault(key, ([], []))
                xs.append(row["step"])
                ys.append(value)
    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    for key, (xs, ys) in sorted(series.items()):
        ax.plot(xs, ys, label=key, marker="." if len(xs) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    if series:
        ax.legend()
    fig.tight_layout()
    save_figure(fig, png)
