"""Train one self-play iteration: TRL's KTOTrainer with the nnPU loss of :mod:`.loss`.

TRL 1.16's KTOTrainer has no loss hook, so :class:`NnPUKTOTrainer` overrides ``compute_loss``: it
runs the policy and the reference model (the iteration's starting model) on the batch with TRL's
fused LM head (per-token log-probabilities of the completion tokens; on a CPU the model's own head at
the completion positions, :func:`modelmake.lm_head.compact_lm_head`: TRL's head scores every
position in torch tiles there), sums them per sequence and calls :func:`.loss.nnpu_kto_loss`.
TRL's own KL estimate from mismatched pairs is not used (the anchors are batch means), so the
trainer runs with ``loss_type="apo_zero_unpaired"``, the TRL setting that turns that estimate off;
the loss it would compute is never called.

The KTO dataset keeps each id's real and generated answers next to each other in a seeded order
(:func:`.data.to_kto`) and the trainer reads it sequentially, so every even batch holds as many
real as generated answers: both risks are estimated on every step. On several processes each reads
whole batches in turn (accelerate's batch sharding), so that still holds per process.

How it scales (processes, GPUs, precision, DeepSpeed ZeRO-1/2, gradient checkpointing, LoRA merged
into the model folder) comes from ``selfplay.scale`` (:mod:`modelmake.launch`); rank 0 writes the
model folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from modelmake.config import fill_defaults
from modelmake.errors import UserError

log = logging.getLogger(__name__)


def train_settings(given: dict) -> dict:
    """One iteration's training settings: ``given`` filled with the schema's $defs/selfplay_train
    defaults; a key the schema does not list is refused."""
    s = fill_defaults("$defs.selfplay_train", given, check="selfplay.train")
    if not 0 <= s["prior"] < 1:
        raise UserError(f"selfplay.train.prior: {s['prior']} must be in [0, 1)")
    return s


def _trainer_class():
    """Defined lazily: importing trl takes seconds and the CLI must start fast."""
    import torch
    from trl import KTOTrainer

    from modelmake.selfplay.loss import nnpu_kto_loss
    from modelmake.lm_head import compact_lm_head

    class NnPUKTOTrainer(KTOTrainer):
        """KTOTrainer whose loss is the nnPU KTO loss (formula in :mod:`modelmake.selfplay.loss`).

        Extra arguments: ``prior`` (share of good answers among the generated ones) and ``gamma``
        (corrective step size). beta and the desirable/undesirable weights come from KTOConfig.
        """

        def __init__(self, *args, prior: float, gamma: float, **kwargs):
            self.prior, self.gamma = prior, gamma
            super().__init__(*args, **kwargs)
            for m in (self.model, self.ref_model):  # on a CPU: the model's own head at the completions
                if m is not None:
                    compact_lm_head(m)

        def _sequence_logps(self, model, batch):
            labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                        use_cache=False, fused_lm_head=True)
            return out.log_probs[:, -(batch["input_ids"].size(1) - 1):].sum(-1)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            batch = {k: (v.to(self.accelerator.device) if isinstance(v, torch.Tensor) else v)
                     for k, v in inputs.items()}
            policy = self._sequence_logps(model, batch)
            with torch.no_grad():
                if self.precompute_ref_logps:
                    ref = batch["ref_logps"]
                else:
                    ref = self._sequence_logps(self.ref_model, batch)
            out = nnpu_kto_loss(policy, ref, batch["label"], beta=self.beta, prior=self.prior,
                                gamma=self.gamma, desirable_weight=self.desirable_weight,
                                undesirable_weight=self.undesirable_weight)
            m = self._metrics[mode]
            for key, value in [("risk", out.risk), ("risk/positive", out.positive_risk),
                               ("risk/negative", out.negative_risk), ("corrective", float(out.corrective)),
                               ("anchor/real", out.anchor_real), ("anchor/generated", out.anchor_generated),
                               ("rewards/chosen", out.reward_real), ("rewards/rejected", out.reward_generated),
                               ("rewards/margins", out.reward_real - out.reward_generated)]:
                if value == value:  # not nan
                    m[key].append(value)
            if return_outputs:
                return out.loss, {"policy_logps": policy.detach()}
            return out.loss

    return NnPUKTOTrainer


def nnpu_kto_trainer(*args, **kwargs):
    """An :class:`NnPUKTOTrainer` (see :func:`_trainer_class`)."""
    return _trainer_class()(*args, **kwargs)


def train_iteration(dataset: str | Path, start_model: str | Path, out: str | Path, *, ckpt_dir: str | Path,
                    settings: dict, seed: int, loss_png: str | Path, config: dict | None = None,
                    scale: dict | None = None) -> dict:
    """Train the iteration's model from ``start_model`` (also the reference) on the KTO parquet.

    Checkpoints go to ``ckpt_dir`` (not a declared output: it survives a killed job); a rerun with
    the same settings and the same data and start model (by content) resumes from the last complete
    one, any other rerun starts over (:func:`modelmake.training.prepare_checkpoint_dir`).
    The model folder is written by :func:`modelmake.training.save_model_folder` (manifest last).
    """
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig

    from modelmake import launch, training
    from modelmake.training import checkpoint_key, plot_loss_curves, prepare_checkpoint_dir, seed_everything

    started = time.time()
    s = train_settings(settings)
    sc = launch.scale_settings(scale, "selfplay.scale")
    problems = launch.scale_problems(sc, "selfplay.scale", zero3=False)
    if problems:
        raise UserError("; ".join(problems))
    if not Path(start_model, "config.json").exists():
        raise UserError(f"{start_model}: not a model folder (no config.json); build it first")
    ds = datasets.load_dataset("parquet", data_files=str(dataset), split="train")
    if set(ds["label"]) != {True, False}:
        raise UserError(f"{dataset}: needs both real (label true) and generated (label false) answers")
    ds = ds.remove_columns([c for c in ds.column_names if c not in ("prompt", "completion", "label")])

    ckpt_dir = Path(ckpt_dir)
    key = checkpoint_key({"settings": s, "seed": seed, "scale": launch.recipe(sc)},
                         [dataset, start_model, *([sc["deepspeed"]] if sc["deepspeed"] else [])])
    scale_args = launch.trainer_args(sc)  # before the model: DeepSpeed's process state
    resume = prepare_checkpoint_dir(ckpt_dir, key)

    seed_everything(seed)
    tok = AutoTokenizer.from_pretrained(start_model)
    model = AutoModelForCausalLM.from_pretrained(start_model, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(start_model, dtype=torch.float32)
    model = launch.apply_lora(model, sc["lora"])
    args = KTOConfig(
        output_dir=str(ckpt_dir), seed=seed, data_seed=seed, **scale_args, beta=s["beta"],
        loss_type="apo_zero_unpaired",
        desirable_weight=s["desirable_weight"], undesirable_weight=s["undesirable_weight"],
        learning_rate=s["learning_rate"], num_train_epochs=s["epochs"], lr_scheduler_type="constant",
        per_device_train_batch_size=s["batch_size"], train_sampling_strategy="sequential",
        max_length=s["max_length"], logging_steps=1, save_strategy="steps", save_steps=s["save_steps"],
        save_total_limit=1, report_to=[], dataset_num_proc=None, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = nnpu_kto_trainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok,
                               prior=s["prior"], gamma=s["gamma"])
    result = trainer.train(resume_from_checkpoint=resume)
    history = trainer.state.log_history
    if not trainer.is_world_process_zero():
        return {"steps": trainer.state.global_step}  # rank 0 writes the model folder
    plot_loss_curves(history, loss_png, title=f"nnPU-KTO ({Path(out).parent.name})")
    logged = [h for h in history if "loss" in h]
    counts = {"examples": len(ds), "steps": trainer.state.global_step,
              "processes": int(os.environ.get("WORLD_SIZE", "1")),
              "resumed_from": Path(resume).name if resume else None,
              "train_loss": result.training_loss,
              "corrective_share": (sum(h.get("corrective", 0) for h in logged) / len(logged)) if logged else None}
    training.save_model_folder(out, launch.merged(trainer.model), tok,
                               config=config or {"train": s, "seed": seed, "scale": sc},
                               inputs=[dataset, start_model], counts=counts, started=started,
                               extra={"log_history.json": history})
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # done: a later rerun must not resume from these
    log.info("trained %s: %s", out, counts)
    return counts
