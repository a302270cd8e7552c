"""A ZeRO-3 checkpoint -> one Hugging Face model folder (safetensors), loadable by from_pretrained.

ZeRO-3 leaves every rank's partition of the flat fp32 parameters in ``global_stepN/*_optim_states.pt``;
DeepSpeed's ``zero_to_fp32`` facility (``get_fp32_state_dict_from_zero_checkpoint``) stitches them
back into a full state dict (it reads the tag from ``latest`` and restores shared, i.e. tied,
weights). The state dict is loaded into a model built from the checkpoint's ``config.json``, every
parameter checked, and saved with the tokenizer and ``router.json`` through
``training.save_model_folder`` (atomic, manifest last).

When the training run recorded ``weights_digest.json`` (hashes of the gathered trained weights),
the consolidated weights must match it exactly, in the dtype training used; otherwise this fails.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from modelmake.errors import UserError
from modelmake.files import read_json
from modelmake.router.tokens import ROUTER_JSON

log = logging.getLogger(__name__)


class ConsolidationError(UserError):
    """The consolidated weights do not match the checkpoint's record of the trained weights."""


def zero_state_dict(checkpoint: str | Path, tag: str | None = None) -> dict:
    """The full fp32 state dict of a ZeRO (stage 2 or 3) checkpoint folder."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint = Path(checkpoint)
    if tag is None and not (checkpoint / "latest").is_file():
        raise UserError(f"{checkpoint}: no 'latest' file; not a DeepSpeed checkpoint folder (or pass a tag)")
    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=tag)


def verify_digest(state_dict: dict, digest: dict) -> None:
    """Every recorded tensor is present with the same shape and, cast to its training dtype, the same bytes."""
    import torch

    from modelmake.router.train import tensor_sha256

    problems = []
    for name, rec in digest.items():
        t = state_dict.get(name)
        if t is None:
            problems.append(f"{name}: missing")
        elif list(t.shape) != rec["shape"]:
            problems.append(f"{name}: shape {list(t.shape)} != trained {rec['shape']}")
        elif tensor_sha256(t.to(getattr(torch, rec["dtype"]))) != rec["sha256"]:
            problems.append(f"{name}: values differ from the trained weights")
    if problems:
        raise ConsolidationError("consolidated weights differ from the trained ones:\n  " + "\n  ".join(problems[:20]))


def consolidate(checkpoint: str | Path, out: str | Path, *, config: dict, tag: str | None = None) -> dict:
    """Write the model folder ``out`` from the ZeRO checkpoint folder ``checkpoint``; return counts."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from modelmake.training import save_model_folder

    started = time.time()
    checkpoint = Path(checkpoint)
    state = zero_state_dict(checkpoint, tag)
    digest_path = checkpoint / "weights_digest.json"
    if digest_path.is_file():
        verify_digest(state, read_json(digest_path))
    cfg = AutoConfig.from_pretrained(checkpoint)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise ConsolidationError(f"{checkpoint}: weights the model config does not have: {unexpected[:10]}")
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise ConsolidationError(f"{checkpoint}: no weights for {still_meta[:10]} (missing: {missing[:10]})")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    extra = {ROUTER_JSON: read_json(checkpoint / ROUTER_JSON)} if (checkpoint / ROUTER_JSON).is_file() else {}
    if (checkpoint / "metrics.json").is_file():
        extra["metrics.json"] = read_json(checkpoint / "metrics.json")
    n_params = sum(t.numel() for t in state.values())

    def copy_loss_curve(tmp: Path) -> None:
        if (checkpoint / "loss.png").is_file():
            shutil.copy(checkpoint / "loss.png", tmp / "loss.png")

    out = save_model_folder(out, model, tokenizer, config=config, inputs=[checkpoint],
                            counts={"tensors": len(state), "parameters": n_params,
                                    "verified_against_digest": digest_path.is_file()},
                            started=started, extra=extra, write=copy_loss_curve)
    log.info("consolidated %d tensors (%d parameters) from %s into %s", len(state), n_params, checkpoint, out)
    return {"tensors": len(state), "parameters": n_params}
