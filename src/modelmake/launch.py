"""One way to scale training: how a training job starts its processes, and what each process takes
from the same ``scale`` settings (schema ``$defs/scale``) in router, arena, self-play and distillation.

A pipeline's section holds ``scale`` (``router.scale``, ``arena.scale``, ``selfplay.scale``,
``distill.scale``): ``processes`` per node, ``nodes``, ``gpu``, ``precision``, ``deepspeed``,
``gradient_checkpointing``, ``lora``. The rule side (``rules/common.smk``):

* :func:`launch_command` is the command prefix of a training rule's shell, before
  ``-m modelmake <entry point>``:

  - 1 process on 1 node: ``python``;
  - N processes on 1 node: ``torchrun --standalone --nproc_per_node N --no-python -- python`` (a
    local rendezvous);
  - N processes on each of M nodes (inside a SLURM allocation of M nodes)::

        srun --nodes M --ntasks-per-node 1 --kill-on-bad-exit 1 torchrun --nnodes M --nproc_per_node N
          --rdzv_backend c10d --rdzv_id "$SLURM_JOB_ID"
          --rdzv_endpoint "$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)":29400
          --no-python -- python

    one torchrun per node, meeting at a c10d rendezvous on the allocation's first node; every node
    runs the same entry point and ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` come from torchrun.

  ``--no-python -- python``: after ``--`` torchrun reads nothing of the entry point's arguments.
  Without it, torchrun's parser (argparse, abbreviations allowed) refuses an entry point option that
  abbreviates two of its own (``selfplay-train --start``: "ambiguous option: --start could match
  --start-method, --start_method") and takes one that abbreviates one of its own.
    The job's shell runs in the batch script, not in a one-task step (:func:`scale_resources` sets
    the ``mpi`` resource, which tells snakemake-executor-plugin-slurm to leave ``srun`` to the
    command), so the ``srun`` gets every node;
* :func:`scale_resources`: the Snakemake resources of the job (see there for how several nodes are
  asked for).

The process side (the library's training code):

* :func:`trainer_args`: the ``TrainingArguments`` fields every Trainer-based pipeline (router,
  arena, self-play) takes from ``scale``: ``bf16`` / ``fp16``; ``use_cpu`` without ``gpu`` (and
  without DeepSpeed, which brings its own CPU accelerator); ``deepspeed``; ``gradient_checkpointing``
  (non-reentrant, so frozen inputs and DDP work); ``ddp_backend`` gloo on CPU with several
  processes; for DeepSpeed on CPU, accelerate's state set up over gloo (:func:`deepspeed_cpu_state`)
  and taken by the args. Call it before building the args and before ``from_pretrained`` (ZeRO-3
  shards the weights as they load);
* :func:`apply_lora` / :func:`merged`: LoRA adapters (peft) on the model when ``lora`` is set, and
  the plain model with the adapters merged in for saving: **the model folder holds merged weights**,
  so it loads with ``from_pretrained`` (and serves with vLLM, exports, scores) like a fully trained
  one; checkpoints hold the adapters and their optimizer state, so a killed run resumes cheaply;
* rank 0 writes model folders (``trainer.is_world_process_zero()``) and prepares the checkpoint
  folder (``training.prepare_checkpoint_dir`` reads ``RANK``), the others wait;
* :func:`die_with_launcher`: a torchrun worker dies with its launcher (torchrun starts each worker
  in a session of its own: a kill of the job's process group would leave them training on);
* :func:`rank_env`: the environment of one process of a world (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), for a supervisor that starts its own processes
  (distillation's teacher service) and for the one-process world DeepSpeed needs without a launcher
  (:func:`ensure_process_group_env`);
* :func:`autocast`: the precision of a plain torch training loop (distillation).

:func:`scale_problems` is what the config check says about a section's ``scale`` (fp16 needs GPUs,
what a pipeline does not offer).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

from modelmake.config import fill_defaults
from modelmake.errors import UserError

log = logging.getLogger(__name__)

RDZV_PORT = 29400  # the c10d rendezvous port on the first node of a multi-node allocation


def scale_settings(given: dict | None = None, where: str = "scale") -> dict:
    """``given`` filled with the schema's ``$defs/scale`` defaults (``lora`` with ``$defs/lora``'s);
    a key the schema does not list raises ``ConfigError`` naming ``where``."""
    s = fill_defaults("$defs.scale", given or {}, check=where)
    if s["lora"] is not None:
        s["lora"] = fill_defaults("$defs.lora", s["lora"], check=f"{where}.lora")
    return s


def world_size(scale: dict, processes: int | None = None) -> int:
    """Processes of the whole job: per node (``processes``, or the pipeline's own count) x nodes."""
    s = scale_settings(scale)
    return (processes or s["processes"]) * s["nodes"]


def launch_command(scale: dict, *, port: int = RDZV_PORT) -> str:
    """The shell prefix that starts a training entry point (``<prefix> -m modelmake ...``) on the
    processes and nodes of ``scale`` (see the module docstring)."""
    s = scale_settings(scale)
    n, m = s["processes"], s["nodes"]
    entry = "--no-python -- python"  # torchrun parses none of the entry point's arguments
    if m == 1:
        return "python" if n == 1 else f"torchrun --standalone --nproc_per_node {n} {entry}"
    head = '"$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"'
    return (f"srun --nodes {m} --ntasks-per-node 1 --kill-on-bad-exit 1 "
            f"torchrun --nnodes {m} --nproc_per_node {n} --rdzv_backend c10d --rdzv_id \"$SLURM_JOB_ID\" "
            f"--rdzv_endpoint {head}:{port} {entry}")


def scale_resources(scale: dict, processes: int | None = None) -> dict[str, Any]:
    """Snakemake resources of a training job from ``scale``. ``processes``: the pipeline's own process
    count per node, when it starts its processes itself (distillation's teacher service).

    One node: ``gpu`` (one per process when ``gpu``, else 0) and ``nodes: 1``. Several nodes, as
    snakemake-executor-plugin-slurm 2.8 submits them: ``nodes``; GPUs per node as ``gres: gpu:N``
    (``--gres`` counts per node; ``gpu`` would be ``--gpus``, a total SLURM may spread unevenly, and
    the slurm profile's per-node ``gpu`` limit would cut it down); ``mpi`` and ``tasks`` = nodes, so
    the plugin runs the shell in the batch script (``srun`` is the launcher's, :func:`launch_command`)
    with ``--ntasks`` = nodes; ``tasks_per_gpu: 0`` keeps it from turning ``tasks`` into
    ``--ntasks-per-gpu``.
    """
    s = scale_settings(scale)
    per_node = processes or s["processes"]
    if s["nodes"] == 1:
        return {"gpu": per_node if s["gpu"] else 0, "nodes": 1}
    out: dict[str, Any] = {"nodes": s["nodes"], "mpi": "srun", "tasks": s["nodes"]}
    if s["gpu"]:
        out.update(gres=f"gpu:{per_node}", tasks_per_gpu=0)
    return out


def zero_stage(deepspeed: str | os.PathLike | None) -> int | None:
    """The ZeRO stage of a DeepSpeed JSON config (0 when it names none), None without a config or
    when it cannot be read (the config check reports a missing file by itself)."""
    import json

    if not deepspeed:
        return None
    try:
        with open(deepspeed, encoding="utf-8") as f:
            return int(json.load(f).get("zero_optimization", {}).get("stage", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def scale_problems(scale: dict, where: str, *, lora: bool = True, multi_process: bool = True,
                   lora_with_deepspeed: bool = True, zero3: bool = True) -> list[str]:
    """What is wrong with a section's ``scale`` (validated by the schema already), named by key path.

    ``lora``: the pipeline offers LoRA; ``multi_process``: ``processes`` / ``nodes`` are the
    pipeline's to set (distillation's come from its service layout); ``lora_with_deepspeed``: LoRA
    and DeepSpeed together (the router's ZeRO output is consolidated from full weights); ``zero3``:
    a ZeRO-3 config (arena and self-play save the model folder from rank 0's replica of the weights,
    which ZeRO-3 shards: ZeRO-1/2 there).
    """
    out = []
    if scale.get("precision") == "fp16" and not scale.get("gpu"):
        out.append(f"{where}.precision: fp16 needs GPUs (gpu: true); on CPU use bf16 or fp32")
    if scale.get("lora") is not None and not lora:
        out.append(f"{where}.lora: this pipeline does not offer LoRA; set it to null")
    if scale.get("lora") is not None and scale.get("deepspeed") and not lora_with_deepspeed:
        out.append(f"{where}.lora: not with deepspeed here (its ZeRO checkpoint is consolidated from full "
                   f"weights); set deepspeed or lora to null")
    if not zero3 and zero_stage(scale.get("deepspeed")) == 3:
        out.append(f"{where}.deepspeed: ZeRO-3 shards the weights that this pipeline saves from rank 0; "
                   f"use a ZeRO stage 1 or 2 config")
    if not multi_process and (scale.get("processes", 1) != 1 or scale.get("nodes", 1) != 1):
        out.append(f"{where}: processes and nodes stay 1 here (the pipeline lays out its own processes)")
    return out


# --- inside a training process


def rank_env(rank: int, world: int, port: int, *, local_rank: int | None = None,
             addr: str = "127.0.0.1") -> dict[str, str]:
    """The torch.distributed environment of process ``rank`` of a ``world`` meeting at ``addr:port``."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank if local_rank is None else local_rank),
            "MASTER_ADDR": addr, "MASTER_PORT": str(port)}


def ensure_process_group_env() -> None:
    """A one-process world for torch.distributed when no launcher (torchrun, deepspeed) set one:
    DeepSpeed needs a process group even for one process."""
    from modelmake.procs import free_port

    if "WORLD_SIZE" not in os.environ:
        os.environ.update(rank_env(0, 1, free_port()))


def die_with_launcher() -> None:
    """Under torchrun, tie this worker to its launcher: SIGKILL when the launcher dies, however it dies.

    torchrun starts each worker in a session of its own, so killing the job's process group (kill -9
    of a job, Snakemake stopped hard) would leave the workers training on as orphans, writing
    checkpoints beside the rerun's. The CLI calls this first thing; a no-op without torchrun.
    """
    import ctypes
    import signal

    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the launcher died before the line above
        os._exit(1)


def deepspeed_cpu_state() -> None:
    """Set up accelerate's process state for DeepSpeed over gloo on CPU, before the Trainer's args.

    Left to itself, accelerate finds no accelerator on CPU, keeps no backend and then counts one
    process whatever the world size: with two processes the Trainer sizes DeepSpeed's batch for one
    and DeepSpeed refuses it (train_batch_size 4 != 4 * 1 * 2). Naming the backend here gives the
    state the real world size; the args then take it (``use_configured_state``).
    """
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


def check_device(scale: dict) -> None:
    """``gpu: true`` must find CUDA: training on CPU instead would be silent and slow."""
    import torch

    if scale["gpu"] and not torch.cuda.is_available():
        raise UserError("scale.gpu is true but this process sees no CUDA device: ask the job for GPUs "
                        "(the rule's gpu resource) or set gpu: false")
    if scale["precision"] == "fp16" and not scale["gpu"]:
        raise UserError("scale.precision fp16 needs GPUs (gpu: true); on CPU use bf16 or fp32")


def trainer_args(scale: dict) -> dict[str, Any]:
    """The ``TrainingArguments`` (``SFTConfig``, ``KTOConfig``) fields of ``scale``; sets up the
    process state DeepSpeed needs first (see the module docstring), so call it before building the
    args and loading the model."""
    s = scale_settings(scale)
    check_device(s)
    ds = s["deepspeed"]
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ds is not None:
        ensure_process_group_env()
        if not s["gpu"]:
            deepspeed_cpu_state()
    return {
        "bf16": s["precision"] == "bf16",
        "fp16": s["precision"] == "fp16",
        # plain: CPU without gpu; DeepSpeed on CPU: its CPU accelerator and a gloo group
        "use_cpu": not s["gpu"] and ds is None,
        "deepspeed": str(ds) if ds is not None else None,
        "accelerator_config": {"use_configured_state": True} if ds is not None and not s["gpu"] else None,
        "ddp_backend": "gloo" if multi and not s["gpu"] and ds is None else None,
        "gradient_checkpointing": s["gradient_checkpointing"],
        "gradient_checkpointing_kwargs": {"use_reentrant": False} if s["gradient_checkpointing"] else None,
    }


def recipe(scale: dict) -> dict:
    """What of ``scale`` a checkpoint must match to be resumed (``training.checkpoint_key``): all but
    the DeepSpeed config's path (pass the file among the key's inputs: it counts by content)."""
    s = scale_settings(scale)
    return {**{k: v for k, v in s.items() if k != "deepspeed"}, "deepspeed": s["deepspeed"] is not None}


def apply_lora(model: Any, lora: dict | None, *, task_type: str = "CAUSAL_LM",
               trainable_tokens: list[int] | None = None) -> Any:
    """``model`` with LoRA adapters (peft) when ``lora`` is set, else ``model`` unchanged.

    ``task_type`` ``SEQ_CLS`` also trains the classification head in full (peft's
    ``modules_to_save``); ``trainable_tokens``: embedding rows trained in full (tokens the pipeline
    added, e.g. the router's label tokens, whose rows start random), in the input embeddings and,
    when the model does not tie them, in the output embeddings too (peft's default trains the input
    rows only: an untied model's lm_head rows of the tokens would stay at their initial values).
    """
    if not lora:
        return model
    from peft import LoraConfig, get_peft_model

    lora = fill_defaults("$defs.lora", lora)
    rows = token_rows(model, trainable_tokens) if trainable_tokens else None
    cfg = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                     target_modules=lora["target_modules"], task_type=task_type, trainable_token_indices=rows)
    model = get_peft_model(model, cfg)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA r=%d on %s: %d of %d parameters trainable", lora["r"], lora["target_modules"], trainable, total)
    return model


def token_rows(model: Any, tokens: list[int]) -> dict[str, list[int]]:
    """peft's ``trainable_token_indices`` for rows ``tokens`` of the embeddings: {module name: rows}
    for the input embeddings, and for the output embeddings when they are not tied to the input ones."""
    names = {id(m): n for n, m in model.named_modules()}
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    rows = {names[id(inp)]: list(tokens)}
    if out is not None and out.weight is not inp.weight:
        rows[names[id(out)]] = list(tokens)
    return rows


def merged(model: Any) -> Any:
    """The plain model of a LoRA-trained one (adapters merged into the weights), else ``model``."""
    if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        return model.merge_and_unload()
    return model


def autocast(scale: dict, device: Any):
    """The mixed-precision context of a plain torch training step on ``device`` (a no-op for fp32)."""
    import torch

    s = scale_settings(scale)
    if s["precision"] == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if s["precision"] == "bf16" else torch.float16
    # no cache of cast weights: gradient checkpointing's recomputation would find them cached and save
    # fewer tensors than the forward did (torch.utils.checkpoint.CheckpointError)
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=False)
