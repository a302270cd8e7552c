"""What every training pipeline shares: seeding, resuming, saving a model folder, loss curves.

Pipelines (router, selfplay, arena, distill) train with TRL / transformers / plain torch; this
module is the one place for the conventions around that:

* ``seed_everything(seed)`` before building data loaders and models;
* ``checkpoint_key(settings, inputs)`` and ``prepare_checkpoint_dir(ckpt_dir, key)``: the one
  rule for whether checkpoints a killed run left may be resumed. The key is a digest of the settings
  and of the *contents* of the inputs (a model folder by its ``manifest.json``, a file by its bytes;
  never their paths); the checkpoint folder's marker (``modelmake-checkpoint.json``) holds the key of
  the run that wrote it. Rank 0 empties a folder marked with another key and marks it; other ranks
  only wait for the mark. It returns ``resume_checkpoint(ckpt_dir)``;
* ``resume_checkpoint(output_dir)``: the last complete ``checkpoint-N`` folder a killed run left
  (pass it to ``trainer.train(resume_from_checkpoint=...)``), or None;
* ``new_model_folder(out)`` then ``finish_model_folder(tmp, out, ...)``: the one way a model folder
  is finished: built under ``<out>.tmp``, then ``provenance.json`` and, last, ``manifest.json``
  (file sizes and hashes), then renamed into place: a half-written model folder never looks
  complete. ``save_model_folder(out, model, tokenizer, ...)`` does both around ``save_pretrained``;
* ``plot_loss_curves(log_history, png)``: the curves people would rather look at than read;
* ``peak_memory_bytes(device)``: what a run's timing record reports as its memory high-water mark.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from modelmake.files import MANIFEST, content_digest, read_json, sha256_file, write_json, write_provenance

log = logging.getLogger(__name__)

CHECKPOINT_MARKER = "modelmake-checkpoint.json"  # in a checkpoint folder: the key of the run that wrote it


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


def peak_memory_bytes(device: Any = None) -> int:
    """This process's memory high-water mark: on a CUDA ``device`` the most its tensors held
    (``torch.cuda.max_memory_allocated``), else the resident set's (``ru_maxrss``, of this process or
    of its largest waited-for child, whichever is larger)."""
    if device is not None and getattr(device, "type", device) == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated(device))
    import resource

    kib = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return kib * 1024


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


def _json_digest(obj: Any) -> str:
    """SHA-256 of ``obj`` as JSON with sorted keys (what ``files.digest`` will be: swap at merge)."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def input_digest(path: str | os.PathLike) -> str:
    """The contents of one input, cheaply (``files.content_digest``): a model folder modelmake finished
    (it has ``manifest.json``, written last, with every file's sha256) by that manifest, not by
    hashing its weights again; a file by its bytes; any other folder by its files' names and bytes."""
    return content_digest(path)


def checkpoint_key(settings: Any, inputs: Iterable[str | os.PathLike] = ()) -> str:
    """What a checkpoint must match to be resumed: ``settings`` (anything JSON, keys sorted) and the
    contents of ``inputs`` in order (:func:`input_digest`), not their paths: the same data moved keeps
    the key, new data at the same path changes it."""
    return _json_digest({"settings": settings, "inputs": [input_digest(p) for p in inputs]})


def _marked_key(marker: Path) -> str | None:
    try:
        return read_json(marker).get("key")
    except (OSError, ValueError, AttributeError):  # absent, being replaced, or not ours
        return None


def prepare_checkpoint_dir(ckpt_dir: str | os.PathLike, key: str, *, rank: int | None = None,
                           wait_s: float = 120.0) -> str | None:
    """Keep in ``ckpt_dir`` only checkpoints of the run ``key`` (:func:`checkpoint_key`) stands for;
    return the one to resume (:func:`resume_checkpoint`), or None.

    Rank 0 (``rank``, default the ``RANK`` environment variable, else 0) decides: when the folder's
    marker (:data:`CHECKPOINT_MARKER`) is missing or holds another key, everything in the folder is
    removed (checkpoints of other settings or inputs would train the new run from the wrong start),
    then the marker is written. Every other rank never deletes or writes: it waits up to ``wait_s``
    seconds for the marker to hold ``key`` (rank 0 writes it after clearing).
    """
    ckpt = Path(ckpt_dir)
    marker = ckpt / CHECKPOINT_MARKER
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        deadline = time.monotonic() + wait_s
        while _marked_key(marker) != key:
            if time.monotonic() > deadline:
                raise RuntimeError(f"rank 0 did not mark {ckpt} for this run within {wait_s:g} s")
            time.sleep(0.2)
        return resume_checkpoint(ckpt)
    if _marked_key(marker) != key:
        if ckpt.is_dir() and any(ckpt.iterdir()):
            log.info("%s holds checkpoints of other settings or inputs: starting afresh", ckpt)
            for p in ckpt.iterdir():
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        ckpt.mkdir(parents=True, exist_ok=True)
        write_json(marker, {"key": key})
    return resume_checkpoint(ckpt)


def new_model_folder(out: str | os.PathLike, *, rank: int = 0) -> Path:
    """The temporary folder ``<out>.tmp`` to build the model folder ``out`` in, then
    :func:`finish_model_folder`. Rank 0 empties and creates it; other ranks only get its path (they
    write into it after a barrier)."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    return tmp


def finish_model_folder(
    tmp: str | os.PathLike,
    out: str | os.PathLike,
    *,
    config: Any,
    inputs: Iterable[str | os.PathLike] = (),
    counts: dict | None = None,
    started: float | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Finish the folder built in ``tmp`` (:func:`new_model_folder`) and move it to ``out``.

    ``extra`` maps file names to JSON objects written into it (metrics, label maps); then
    ``provenance.json``; then, last, ``manifest.json`` (every file's size and sha256: a folder with
    it is complete, and :func:`input_digest` reads it instead of rehashing); then the rename,
    replacing what ``out`` held.
    """
    tmp, out = Path(tmp), Path(out)
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
    write: Callable[[Path], Any] | None = None,
) -> Path:
    """Save a HF model folder atomically: ``save_pretrained`` into :func:`new_model_folder`, then
    :func:`finish_model_folder`. ``write(tmp)`` adds more files (a loss curve) before the manifest.
    """
    tmp = new_model_folder(out)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if write is not None:
        write(tmp)
    return finish_model_folder(tmp, out, config=config, inputs=inputs, counts=counts, started=started,
                               extra=extra)


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
