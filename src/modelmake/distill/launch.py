"""The supervisor of one distillation stage: one Snakemake job = one allocation.

It starts, for every group, the teacher process and its trainer ranks (subprocesses of this job,
each in its own session with ``PR_SET_PDEATHSIG``, one log each), then watches them:

* all exit 0 -> the stage is done (trainer 0 wrote the model folder);
* any exits non-zero (or is killed) -> every other process is stopped at once (SIGTERM, then
  SIGKILL) and :class:`TrainingError` names the process, its exit code and the tail of its log;
* a teacher's readiness file (``group{g}.ready``) missing after ``ready_timeout_s`` -> stop all,
  ``ServiceError``;
* this job gets SIGTERM/SIGINT (Snakemake cancelled) -> stop all, exit.

How it scales comes from ``distill.scale`` (:mod:`modelmake.launch`, as in every pipeline) except
the process count, which is the service layout's: with ``gpu`` process ``i`` gets
``CUDA_VISIBLE_DEVICES`` = the i-th GPU of the allocation (teacher and trainers one each), backend
NCCL; without, Gloo and ``threads_per_process`` torch threads each. Each process gets its rank's
environment from ``launch.rank_env``; precision, DeepSpeed and gradient checkpointing reach the
trainers through ``job.json``.

Exposure: a stage is one machine's processes, so nothing of it listens beyond loopback: the
rendezvous (torch's TCPStore, unauthenticated) is served by rank 0 on a socket this supervisor binds
on 127.0.0.1 before any rank starts (``launch.rendezvous_listener``: no other process can take its
port meanwhile), and Gloo's connections use the loopback interface (``GLOO_SOCKET_IFNAME=lo`` unless
set). NCCL's bootstrap picks its own interface (``NCCL_SOCKET_IFNAME`` sets it).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from modelmake.config import default, fill_defaults
from modelmake.errors import ServiceError, UserError
from modelmake.files import write_json
from modelmake.launch import STORE_FD, rank_env, recipe, rendezvous_listener, scale_problems, scale_settings
from modelmake.procs import log_tail, start_in_group, stop_process_groups
from modelmake.training import checkpoint_key, prepare_checkpoint_dir

log = logging.getLogger(__name__)

SRC = str(Path(__file__).resolve().parents[2])  # the folder holding the modelmake package


class TrainingError(UserError):
    """A process of a distillation stage failed; the others were stopped."""


def run_stage(job: dict, log_dir: str | Path, ready_timeout_s: float, scale: dict | None = None) -> None:
    """Run one stage's processes (``job``: what ``job.json`` holds, less what this adds) under
    ``scale`` (``distill.scale``), until all exit."""
    from modelmake.distill.service import Layout

    scale = scale_settings(scale, "distill.scale")
    problems = scale_problems(scale, "distill.scale", lora=False, multi_process=False)
    if problems:
        raise UserError("; ".join(problems))
    gpu = scale["gpu"]

    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Path(job["ckpt"])
    ready_dir = Path(job["ready_dir"])
    ready_dir.mkdir(parents=True, exist_ok=True)
    for old in ready_dir.glob("group*.ready"):
        old.unlink()  # from a killed earlier attempt
    layout = Layout(job["groups"], job["ranks_per_group"])
    service = job["teacher_mode"] == "service"
    world = layout.world_size if service else layout.groups * layout.ranks_per_group
    # the stage's settings and threads with the schema's defaults (distill.stageN, distill.service)
    job = {"threads_per_process": default("distill.service.threads_per_process"), **job,
           "settings": fill_defaults("$defs.distill_stage", job["settings"]),
           "scale": scale, "backend": "nccl" if gpu else "gloo"}
    # this supervisor is the only process that clears and marks the folder; the trainers it starts
    # resume from what it kept (training.resume_checkpoint)
    key = checkpoint_key(resume_settings(job), [job["teacher"], job["student"], *job["data"],
                                                *([scale["deepspeed"]] if scale["deepspeed"] else [])])
    prepare_checkpoint_dir(ckpt, key, rank=0)
    job_path = ckpt / "job.json"
    write_json(job_path, job)
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d] if gpu else []
    if gpu and len(visible) < world:
        raise UserError(f"this stage needs {world} GPUs (groups x (ranks_per_group + 1)), "
                        f"CUDA_VISIBLE_DEVICES has {len(visible)}: raise the rule's gpu resource")
    listener = rendezvous_listener()  # rank 0 serves the rendezvous on it; bound now, so no one takes the port
    procs: list[tuple[str, subprocess.Popen, Path]] = []

    def stop_all(grace_s: float = 10.0) -> None:
        stop_process_groups([(name, p) for name, p, _ in procs], grace_s)

    def on_signal(signum, _frame):
        log.warning("signal %d: stopping every process of the stage", signum)
        stop_all()
        sys.exit(128 + signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for rank in range(world):
            name = (f"teacher{layout.role(rank)[1]}" if service and layout.role(rank)[0] == "teacher"
                    else f"trainer{layout.role(rank)[2] if service else rank}")
            env, fds = rank_process_env(rank, world, listener, job["threads_per_process"],
                                        visible[rank] if gpu else None)
            logf = log_dir / f"{name}.log"
            p = start_in_group([sys.executable, "-m", "modelmake.distill.train", str(job_path)], logf, env,
                               append=False, pass_fds=fds)
            procs.append((name, p, logf))
            log.info("started %s (rank %d, pid %d), log %s", name, rank, p.pid, logf)
        started = time.monotonic()
        ready = [ready_dir / f"group{g}.ready" for g in range(layout.groups)] if service else []
        seen_ready = False
        while True:
            codes = [(n, p.poll(), lf) for n, p, lf in procs]
            failed = [(n, c, lf) for n, c, lf in codes if c not in (None, 0)]
            if failed:
                name, code, logf = failed[0]
                stop_all()
                raise TrainingError(
                    f"{name} exited with code {code}; stopped the other {len(procs) - 1} processes of the stage. "
                    f"Its log ({logf}) ends:\n{log_tail(logf)}")
            if all(c == 0 for _, c, _ in codes):
                break
            if ready and not seen_ready:
                if all(r.exists() for r in ready):
                    seen_ready = True
                    log.info("every teacher is ready (%.1f s)", time.monotonic() - started)
                elif time.monotonic() - started > ready_timeout_s:
                    stop_all()
                    missing = [str(r) for r in ready if not r.exists()]
                    raise ServiceError(f"teacher not ready within distill.ready_timeout_s={ready_timeout_s}: "
                                       f"{missing} missing; see the logs in {log_dir}")
            time.sleep(0.2)
    finally:
        listener.close()
        stop_all(grace_s=2)
        for s, h in old.items():
            signal.signal(s, h)
    for done in ckpt.glob("checkpoint-*"):  # the model folder is complete: checkpoints are spent
        shutil.rmtree(done, ignore_errors=True)
    log.info("stage done: %s", job["out"])


def rank_process_env(rank: int, world: int, listener, threads: int,
                     gpu: str | None = None) -> tuple[dict[str, str], tuple[int, ...]]:
    """The whole environment of rank ``rank`` of a stage, and the file descriptors it inherits:
    rank 0 the rendezvous ``listener`` (``launch.rendezvous_listener``), which it serves the store on."""
    env = {**os.environ, **rank_env(rank, world, listener.getsockname()[1], local_rank=0 if gpu else rank),
           "OMP_NUM_THREADS": str(threads),
           # the children import this very modelmake, whatever sys.path the caller had
           "PYTHONPATH": os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")])),
           "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    if rank != 0:
        return env, ()
    return {**env, STORE_FD: str(listener.fileno())}, (listener.fileno(),)


def resume_settings(job: dict) -> dict:
    """What a checkpoint must match besides the inputs' contents to be resumed: settings (less the
    test hooks), layout and scale (the DeepSpeed config counts by content, among the inputs)."""
    keys = {k: job[k] for k in ("settings", "groups", "ranks_per_group", "teacher_mode", "backend")}
    keys["scale"] = recipe(job["scale"])
    return {**keys, "settings": {k: v for k, v in job["settings"].items()
                                 if k not in ("fail_at_step", "teacher_exit_after")}}
