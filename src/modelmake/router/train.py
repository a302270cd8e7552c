"""Train the router: TRL SFT of a causal LM on the scored conversations.

Fixes against the original script:

* ``[[1]]``..``[[5]]`` are added as special tokens and the embeddings resized (original: kept);
* the chat template renders the conversation (original: ``ROLE:\\n`` text with no EOS, so the trained
  model never learned to stop and generation ran to ``max_new_tokens``); every example's answer is
  ``[[k]]`` then the template's end-of-turn token (``<|eot_id|>``, ``<|im_end|>``: not necessarily
  the tokenizer's ``eos_token``), checked before training;
* the loss is on the assistant answer only (``[[k]]`` + end of turn), from ``chat.assistant_mask``:
  any chat template, with or without ``{% generation %}`` markers; the examples reach TRL
  tokenized (``input_ids`` + ``assistant_masks``) (original: the whole text, instruction included,
  padded to 2048); on a CPU the LM head runs at those positions only
  (:func:`modelmake.lm_head.compact_lm_head`; TRL's fused head scores every position there);
* resumable: the Trainer's checkpoints go to ``ckpt_dir`` (kept when the job fails) and a rerun
  with the same recipe (settings, DeepSpeed config, inputs by content) resumes from the last
  complete one; after a config or data change it starts afresh (``training.prepare_checkpoint_dir``:
  rank 0 clears and marks the folder, the other ranks wait for the mark).

How the job scales comes from ``router.scale`` (:mod:`modelmake.launch`, as in every pipeline):
processes and nodes (torchrun), GPUs, precision, gradient checkpointing, LoRA (adapters on the
base, the label tokens' embedding rows trained in full, merged into the model folder) and
DeepSpeed. DeepSpeed ZeRO-3 runs from a JSON config (``config/router/zero3.json`` on CPU,
``zero3_offload.json`` with CPU offload on GPUs); its output is the final ZeRO-3 checkpoint
(``global_stepN/`` shards, ``latest``) plus the model config, tokenizer and ``router.json``:
``consolidate`` turns it into one model folder. Without DeepSpeed the output is already a model
folder, written by rank 0.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from modelmake.chat import assistant_mask, is_special
from modelmake.config import fill_defaults
from modelmake.errors import UserError
from modelmake.files import write_json
from modelmake.router.tokens import LABEL_TOKENS, ROUTER_JSON, add_label_tokens

log = logging.getLogger(__name__)

DIGEST = "weights_digest.json"  # in a ZeRO-3 output: hashes of the gathered trained weights

# router.train keys of old configs that now live in router.scale (config.py maps them)
OLD_SCALE_KEYS = ("deepspeed", "processes", "gpu", "bf16", "gradient_checkpointing")


def train_settings(given: dict) -> dict:
    """The training settings: ``given`` filled with the schema's router.train defaults (the old
    scale keys, now ``router.scale``'s, left out)."""
    return {k: v for k, v in fill_defaults("router.train", given).items() if k not in OLD_SCALE_KEYS}


def answer_tokens(tokenizer: Any, conversation: list[dict], label_ids: list[int] | None = None,
                  where: str = "an example") -> tuple[list[int], list[int]]:
    """(input_ids, assistant mask) of one router example; the masked answer must be one label
    token then the template's end-of-turn token (a special token), so the router learns to stop."""
    ids, mask = assistant_mask(tokenizer, conversation)
    answer = [i for i, m in zip(ids, mask) if m]
    label_ids = label_ids if label_ids is not None else tokenizer.convert_tokens_to_ids(LABEL_TOKENS)
    if not answer:
        raise UserError(f"{where}: the chat template renders no assistant tokens; the router needs the answer [[k]] "
                        "as the conversation's last (assistant) turn")
    if len(answer) != 2 or answer[0] not in label_ids or not is_special(tokenizer, answer[-1]):
        raise UserError(
            f"{where}: the chat template renders the answer as {tokenizer.convert_ids_to_tokens(answer)}; expected "
            "one label token then the template's end-of-turn token (a special token such as <|eot_id|> or "
            "<|im_end|>), so the router learns to stop after [[k]]. Use a base model whose template ends the "
            "assistant turn on a special token right after its content"
        )
    return ids, mask


def sft_dataset(tokenizer: Any, conversations: list[list[dict]], max_length: int, name: str = "data") -> Any:
    """The conversations tokenized for TRL: ``input_ids`` and ``assistant_masks`` (the loss on
    ``[[k]]`` + end of turn only), every example checked; longer than max_length is refused, since
    truncation would cut the answer off (TRL keeps the start)."""
    from datasets import Dataset

    label_ids = tokenizer.convert_tokens_to_ids(LABEL_TOKENS)
    rows = [answer_tokens(tokenizer, c, label_ids, where=f"{name} example {n}") for n, c in enumerate(conversations)]
    check_lengths([len(ids) for ids, _ in rows], max_length)
    return Dataset.from_dict({"input_ids": [ids for ids, _ in rows], "assistant_masks": [m for _, m in rows]})


def check_lengths(lengths: list[int], max_length: int) -> None:
    """Truncation would cut the answer off (TRL keeps the start): refuse examples longer than max_length."""
    over = [n for n in lengths if n > max_length]
    if over:
        raise UserError(
            f"router.train.max_length: {len(over)} of {len(lengths)} examples are longer than {max_length} tokens "
            f"(longest {max(over)}); truncation would cut off the [[k]] answer. Raise max_length or shorten the prompts"
        )


def train_router(
    train_parquet: str | Path,
    eval_parquet: str | Path,
    base_model: str | Path,
    out: str | Path,
    ckpt_dir: str | Path,
    *,
    settings: dict,
    scale: dict | None = None,
    seed: int,
    config: dict,
) -> dict:
    """SFT the base model into a router; write ``out`` (a ZeRO-3 checkpoint folder with DeepSpeed,
    else a model folder), a loss curve and provenance; return the final metrics. ``scale``:
    ``router.scale`` (:func:`modelmake.launch.scale_settings` fills the defaults)."""
    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from modelmake import launch
    from modelmake.lm_head import compact_lm_head
    from modelmake.training import (
        checkpoint_key, plot_loss_curves, prepare_checkpoint_dir, save_model_folder, seed_everything,
    )

    started = time.time()
    s = train_settings(settings)
    sc = launch.scale_settings(scale, "router.scale")
    problems = launch.scale_problems(sc, "router.scale", lora_with_deepspeed=False)
    if problems:
        raise UserError("; ".join(problems))
    deepspeed = sc["deepspeed"]
    scale_args = launch.trainer_args(sc)  # before the args and the model: DeepSpeed's process state
    seed_everything(seed)
    train_df = pd.read_parquet(train_parquet, columns=["messages", "system"])
    eval_df = pd.read_parquet(eval_parquet, columns=["messages"])
    system = train_df["system"].iloc[0]
    to_list = lambda df: [[dict(m) for m in msgs] for msgs in df["messages"]]  # noqa: E731
    train_convs, eval_convs = to_list(train_df), to_list(eval_df)

    ckpt_dir = Path(ckpt_dir)
    inputs = [train_parquet, eval_parquet, base_model]
    recipe = {"settings": s, "seed": seed, "config": config, "scale": launch.recipe(sc)}
    key = checkpoint_key(recipe, [*inputs, *([deepspeed] if deepspeed else [])])  # DeepSpeed config by content
    resume = prepare_checkpoint_dir(ckpt_dir, key)
    args = SFTConfig(  # built before the model: with ZeRO-3 it makes from_pretrained shard the weights
        output_dir=str(ckpt_dir),
        num_train_epochs=s["epochs"],
        learning_rate=s["lr"],
        per_device_train_batch_size=s["batch_size"],
        per_device_eval_batch_size=s["batch_size"],
        gradient_accumulation_steps=s["grad_accum"],
        warmup_steps=s["warmup_ratio"],  # below 1: a share of the steps
        weight_decay=s["weight_decay"],
        lr_scheduler_type="cosine",
        max_length=s["max_length"],
        assistant_only_loss=False,  # the examples come tokenized, with their own assistant_masks
        packing=False,
        logging_steps=s["logging_steps"],
        eval_strategy="epoch",
        save_strategy="steps",
        save_steps=s["save_steps"],
        save_total_limit=2,
        save_only_model=False,
        report_to=[],
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **scale_args,  # precision, devices, DeepSpeed, gradient checkpointing (TRL's default: on)
    )
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    label_ids = add_label_tokens(tokenizer, model)
    train_ds = sft_dataset(tokenizer, train_convs, s["max_length"], str(train_parquet))
    eval_ds = sft_dataset(tokenizer, eval_convs, s["max_length"], str(eval_parquet))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = launch.apply_lora(model, sc["lora"], trainable_tokens=label_ids)

    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer)
    compact_lm_head(trainer.model, outputs=("entropy", "is_top1"))  # on a CPU; the fields SFTTrainer logs
    result = trainer.train(resume_from_checkpoint=resume)
    history = trainer.state.log_history
    metrics = {
        "train_loss": result.training_loss,
        "eval_loss": next((r["eval_loss"] for r in reversed(history) if "eval_loss" in r), None),
        "steps": trainer.state.global_step,
        "resumed_from": resume,
    }
    router_json = {"system": system, "label_tokens": LABEL_TOKENS, "label_token_ids": label_ids}
    counts = {"train": len(train_ds), "eval": len(eval_ds), **metrics}
    out = Path(out)
    if deepspeed is None:
        if not trainer.is_world_process_zero():
            return metrics  # rank 0 writes the model folder
        save_model_folder(out, launch.merged(trainer.model), tokenizer, config=config, inputs=inputs, counts=counts,
                          started=started, extra={ROUTER_JSON: router_json, "metrics.json": metrics},
                          write=lambda tmp: plot_loss_curves(history, tmp / "loss.png", title="router SFT"))
    else:
        save_zero_checkpoint(trainer, tokenizer, out, router_json=router_json, metrics=metrics, history=history,
                             config=config, inputs=inputs, counts=counts, started=started)
    if trainer.is_world_process_zero():
        write_json(ckpt_dir / "log_history.json", history)
    log.info("router trained: %s", json.dumps(metrics))
    return metrics


def tensor_sha256(t: Any) -> str:
    """SHA-256 of a tensor's bytes (its own dtype, row-major)."""
    import hashlib

    import torch

    return hashlib.sha256(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def weights_digest(model: Any) -> dict:
    """{name: {dtype, shape, sha256}} of the full trained weights, gathered from the ZeRO-3 shards:
    the reference ``consolidate`` checks its output against."""
    import deepspeed

    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {
            name: {"dtype": str(p.dtype).removeprefix("torch."), "shape": list(p.shape), "sha256": tensor_sha256(p)}
            for name, p in params.items()
        }


def save_zero_checkpoint(trainer: Any, tokenizer: Any, out: Path, *, router_json: dict, metrics: dict,
                         history: list, config: dict, inputs: list, counts: dict, started: float) -> None:
    """The engine's ZeRO-3 checkpoint of the final weights, with what a model folder needs beside the
    weights (config, tokenizer, router.json), built in ``training.new_model_folder`` and finished
    (provenance, manifest last, rename) by rank 0 with ``training.finish_model_folder``."""
    import torch.distributed as dist

    from modelmake.training import finish_model_folder, new_model_folder, plot_loss_curves

    rank0 = trainer.args.process_index == 0
    tmp = new_model_folder(out, rank=trainer.args.process_index)
    if dist.is_initialized():
        dist.barrier()
    # every rank writes its own partition of parameters and optimizer state
    trainer.model_wrapped.save_checkpoint(str(tmp), tag=f"global_step{trainer.state.global_step}",
                                          save_latest=True)
    digest = weights_digest(trainer.model)  # collective: every rank gathers the full weights
    if dist.is_initialized():
        dist.barrier()
    if not rank0:
        return
    trainer.model.config.save_pretrained(tmp)
    if getattr(trainer.model, "generation_config", None) is not None:
        trainer.model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    plot_loss_curves(history, tmp / "loss.png", title="router SFT (ZeRO-3)")
    finish_model_folder(tmp, out, config=config, inputs=inputs, counts=counts, started=started,
                        extra={DIGEST: digest, ROUTER_JSON: router_json, "metrics.json": metrics})
