"""The preference classifier: a causal-LM base with a last-token head, two classes (A wins, B wins).

``AutoModelForSequenceClassification`` over a Llama-family folder gives ``LlamaForSequenceClassification``:
the score head reads the hidden state of the last non-pad token (the verdict cue), so ``pad_token_id``
must be set. Training is cross-entropy against soft targets ``[p_a, 1 - p_a]`` (hard labels are the
one-hot case, a tie 0.5/0.5), with the HF Trainer so that a killed stage resumes from its last ``checkpoint-N``.
How it scales (processes, GPUs, precision, DeepSpeed ZeRO-1/2, gradient checkpointing, LoRA with the
score head trained in full) comes from ``arena.scale`` (:mod:`modelmake.launch`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from modelmake.arena.template import TemplateSettings, build_input
from modelmake.config import schema_field

log = logging.getLogger(__name__)

LABELS = {0: "model_a", 1: "model_b"}


@dataclass(frozen=True)
class TrainSettings:
    """A stage's training settings (arena.stage1..3, schema $defs/arena_stage, whose defaults these are)."""

    epochs: float = schema_field("$defs.arena_stage.epochs")
    lr: float = schema_field("$defs.arena_stage.lr")
    batch_size: int = schema_field("$defs.arena_stage.batch_size")
    warmup_ratio: float = schema_field("$defs.arena_stage.warmup_ratio")
    weight_decay: float = schema_field("$defs.arena_stage.weight_decay")
    label_smoothing: float = schema_field("$defs.arena_stage.label_smoothing")  # hard labels: [1 - s/2, s/2]
    swap_augment: bool = schema_field("$defs.arena_stage.swap_augment")  # each pair again, A and B swapped
    save_steps: int = schema_field("$defs.arena_stage.save_steps")  # checkpoint interval (resume point)
    max_steps: int = schema_field("$defs.arena_stage.max_steps")  # > 0 caps the run (tests)


def load_tokenizer(folder: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_classifier(folder: str | Path, tokenizer, dtype=None):
    """A two-class classifier from a causal-LM base folder or from an earlier stage's folder."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=2, id2label=LABELS, label2id={v: k for k, v in LABELS.items()},
        pad_token_id=tokenizer.pad_token_id, dtype=dtype or torch.float32,
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def encode(df, tokenizer, ts: TemplateSettings, swap: bool = False) -> list[list[int]]:
    """Token ids of every row; ``swap`` exchanges response_a and response_b."""
    a, b = ("response_b", "response_a") if swap else ("response_a", "response_b")
    return [build_input(tokenizer, r.prompt, getattr(r, a), getattr(r, b), ts) for r in df.itertuples()]


def collate(rows: list[dict], pad_id: int) -> dict:
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, : len(r["input_ids"])] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if "p_a" in rows[0]:
        p = torch.tensor([r["p_a"] for r in rows], dtype=torch.float32)
        out["soft_labels"] = torch.stack([p, 1 - p], dim=1)
    return out


def soft_cross_entropy(logits, targets):
    return -(targets * logits.float().log_softmax(-1)).sum(-1).mean()


def training_rows(df, tokenizer, ts: TemplateSettings, swap_augment: bool) -> list[dict]:
    """One row per pair (target ``p_a``), plus its A/B-swapped twin (target ``1 - p_a``)."""
    rows = [{"input_ids": ids, "p_a": float(p)} for ids, p in zip(encode(df, tokenizer, ts), df["p_a"])]
    if swap_augment:
        swapped = encode(df, tokenizer, ts, swap=True)
        rows += [{"input_ids": ids, "p_a": 1.0 - float(p)} for ids, p in zip(swapped, df["p_a"])]
    return rows


def train(init: str | Path, train_df, ckpt: str | Path, ts: TemplateSettings, s: TrainSettings,
          seed: int, key: str, scale: dict | None = None):
    """Train a classifier from ``init`` on ``train_df`` (prompt, response_a, response_b, p_a) on the
    processes of ``scale`` (``arena.scale``; each reads its share of every step's batches).

    Checkpoints go to ``ckpt`` (kept when the job fails, so a rerun resumes from the last complete
    one); ``key`` (``training.checkpoint_key`` of the stage's settings and inputs) says which run
    they belong to: checkpoints of another are removed, not resumed. Returns (model, tokenizer,
    log_history, counts): the model plain (LoRA merged in), on rank 0; on other ranks model is None.
    """
    from transformers import Trainer, TrainingArguments

    from modelmake import launch
    from modelmake.training import prepare_checkpoint_dir, seed_everything

    sc = launch.scale_settings(scale, "arena.scale")
    scale_args = launch.trainer_args(sc)
    seed_everything(seed)
    ckpt = Path(ckpt)
    resume = prepare_checkpoint_dir(ckpt, key)
    tok = load_tokenizer(init)
    model = launch.apply_lora(load_classifier(init, tok), sc["lora"], task_type="SEQ_CLS")
    rows = training_rows(train_df, tok, ts, s.swap_augment)

    class SoftTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            targets = inputs.pop("soft_labels")
            out = model(**inputs)
            loss = soft_cross_entropy(out.logits, targets)
            return (loss, out) if return_outputs else loss

    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps_per_epoch = -(-len(rows) // (s.batch_size * world))
    total = s.max_steps if s.max_steps > 0 else max(1, round(steps_per_epoch * s.epochs))
    args = TrainingArguments(
        output_dir=str(ckpt), per_device_train_batch_size=s.batch_size, num_train_epochs=s.epochs,
        max_steps=s.max_steps, learning_rate=s.lr, weight_decay=s.weight_decay,
        lr_scheduler_type="cosine", warmup_steps=int(total * s.warmup_ratio),
        logging_steps=max(1, total // 20), save_strategy="steps", save_steps=s.save_steps,
        save_total_limit=2, report_to="none", seed=seed, data_seed=seed, remove_unused_columns=False,
        label_names=["soft_labels"], dataloader_num_workers=0, disable_tqdm=True, **scale_args,
    )
    trainer = SoftTrainer(model=model, args=args, train_dataset=rows,
                          data_collator=lambda b: collate(b, tok.pad_token_id))
    started = time.time()
    trainer.train(resume_from_checkpoint=resume)
    counts = {"pairs": len(train_df), "examples": len(rows), "steps": trainer.state.global_step,
              "processes": world, "resumed_from": Path(resume).name if resume else None,
              "train_seconds": round(time.time() - started, 3)}
    model = launch.merged(trainer.model) if trainer.is_world_process_zero() else None
    return model, tok, trainer.state.log_history, counts


def predict(model, tokenizer, df, ts: TemplateSettings, batch_size: int = 32, swap: bool = False):
    """P(A wins) of every row, in row order. With ``swap`` the model reads B first and the answer is
    swapped back, so it is again P(the original response_a wins)."""
    import torch

    ids = encode(df, tokenizer, ts, swap=swap)
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(ids), batch_size):
            batch = collate([{"input_ids": x} for x in ids[i: i + batch_size]], tokenizer.pad_token_id)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            probs = model(**batch).logits.float().softmax(-1)
            out += probs[:, 1 if swap else 0].tolist()
    return out


def hard_targets(winners, label_smoothing: float = 0.0) -> list[float]:
    """P(A wins) targets of labelled pairs: ``model_a`` 1, ``model_b`` 0 (smoothed to [1 - s/2, s/2]),
    ``tie`` 0.5 (kept by ``arena.ties: soft``): the soft-target path pseudo-labels take too."""
    hi = 1.0 - label_smoothing / 2
    targets = {"model_a": hi, "model_b": 1.0 - hi, "tie": 0.5}
    try:
        return [targets[w] for w in winners]
    except KeyError as e:
        raise ValueError(f"unknown winner {e.args[0]!r}; expected model_a, model_b or tie") from None


def settings_dict(s) -> dict:
    return asdict(s)
