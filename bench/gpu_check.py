"""The GPU check: every training pipeline for a few steps on one GPU, as the cluster configs run them.

Checks, each in a process of its own with a time limit (the whole run has a budget too):

* ``router``: TRL SFT (``router.train.train_router``) under ``config/cluster/router.yaml``'s scale
  on one process: bf16, DeepSpeed ZeRO-3 with CPU offload (``config/router/zero3_offload.json``),
  gradient checkpointing; then ``router.consolidate`` turns the ZeRO-3 checkpoint into a model
  folder, checked tensor by tensor against the trained weights;
* ``arena``: one classifier stage (``arena.stages.run_stage``) under ``arena.yaml``'s scale: bf16,
  gradient checkpointing, LoRA;
* ``selfplay``: one nnPU-KTO iteration (``selfplay.train.train_iteration``) under ``selfplay.yaml``'s
  scale on one process: bf16, gradient checkpointing;
* ``distill``: a stage-2 distillation stage (``distill.launch.run_stage``) with the teacher and the
  student on the one GPU: the in-process teacher (``teacher_mode: local``; the teacher service
  gives each process a GPU of its own, and NCCL takes one rank per GPU), ZeRO-3 with offload as in
  ``distill.yaml``, bf16, the student's time-mix layers through flash-linear-attention;
* ``fla``: flash-linear-attention's ``chunk_rwkv6`` against the pure-PyTorch recurrence
  (``distill.hybrid``): outputs and gradients of the op, and a hybrid student's logits both ways.

The models are a small random Llama (90M parameters on a GPU, 0.1M with ``--cpu``) with the
demo's tokenizer, and the data the demo's, all built here in the working folder
(``bench/artifacts.py``). With ``--cpu`` the same checks run on the CPU in fp32 (gloo; DeepSpeed's
CPU configs ``config/router/zero3.json`` and ``config/distill/zero3_cpu.json`` stand in for the
offload ones), ``fla`` is skipped, so the test suite runs it and the script cannot rot.

Each check prints ok / fail / skip, steps/s (training steps over the training loop's own clock:
model loading excluded, the router's end-of-epoch evaluation pass included) and peak memory (``torch.cuda
.max_memory_allocated`` on the GPU, the resident set's high-water mark on the CPU); a table sums
up; the exit code is 1 when any check failed.

Run (on a GPU node without network, through the wheels it lacks): ``bench/gpu_check.sh --wheels DIR``.
Run here: ``python bench/gpu_check.py --cpu``. ``--report DIR`` copies the summary and every check's log
there; ``--work DIR`` keeps the working folder (default: a temporary one, removed at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

CHECKS = ("fla", "distill", "router", "arena", "selfplay")  # run in this order: the least known first
RESULT = "result.json"  # what a check's process leaves in its folder

# What each mode builds and runs. gpu: big enough that steps/s and memory mean something, small
# enough that the whole check fits 8 minutes; cpu: the smallest that runs every path.
SIZES = {
    "gpu": {
        "arch": {"hidden_size": 1024, "num_layers": 8, "num_heads": 16, "num_kv_heads": 4,
                 "intermediate_size": 2816, "max_len": 1024, "steps": 1, "batch_size": 8},
        "rwkv_layers": [1, 3, 5, 7],
        "router": {"n_sample": 400, "batch_size": 16, "max_length": 512},
        "arena": {"max_steps": 10, "batch_size": 8, "max_length": 512},
        "selfplay": {"ids": 40, "batch_size": 8, "max_length": 512},
        "distill": {"steps": 10, "batch_size": 8, "max_len": 512, "rows": 160, "topk": 64},
        "fla": {"batch": 2, "heads": 16, "length": 512, "head_dim": 64},
        # fla and distill compile fla's Triton kernels (autotuned) the first time; prepare, CPU Adam
        "timeout_s": {"prepare": 240, "fla": 150, "distill": 180, "router": 180, "arena": 120,
                      "selfplay": 120},
        "budget_s": 420,
    },
    "cpu": {
        "arch": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
                 "intermediate_size": 128, "max_len": 256, "steps": 1, "batch_size": 4},
        "rwkv_layers": [1],
        "router": {"n_sample": 32, "batch_size": 8, "max_length": 256},
        "arena": {"max_steps": 3, "batch_size": 4, "max_length": 96},
        "selfplay": {"ids": 6, "batch_size": 4, "max_length": 96},
        "distill": {"steps": 3, "batch_size": 2, "max_len": 32, "rows": 24, "topk": 8},
        "fla": None,
        "timeout_s": {"prepare": 420, "fla": 60, "distill": 240, "router": 240, "arena": 180,
                      "selfplay": 180},
        "budget_s": 900,
    },
}

# --cpu: DeepSpeed's CPU configs for the GPU ones the cluster configs name
CPU_DEEPSPEED = {"config/router/zero3_offload.json": "config/router/zero3.json",
                 "config/distill/zero3_offload.json": "config/distill/zero3_cpu.json"}


# --- inside a check's process


def cluster_scale(pipeline: str, gpu: bool) -> dict:
    """``<pipeline>.scale`` of ``config/cluster/<pipeline>.yaml`` on one process of one node: bf16 on
    the GPU (the distillation config leaves precision at fp32), fp32 and DeepSpeed's CPU configs on
    the CPU."""
    import yaml

    scale = dict(yaml.safe_load((REPO / f"config/cluster/{pipeline}.yaml").read_text())[pipeline]["scale"])
    scale.update(processes=1, nodes=1, gpu=gpu, precision="bf16" if gpu else "fp32")
    ds = scale.get("deepspeed")
    if ds:
        scale["deepspeed"] = str(REPO / (ds if gpu else CPU_DEEPSPEED.get(ds, ds)))
    return scale


def describe(scale: dict) -> str:
    ds = Path(scale["deepspeed"]).name if scale.get("deepspeed") else None
    parts = [scale["precision"], f"DeepSpeed {ds}" if ds else None,
             "grad ckpt" if scale.get("gradient_checkpointing") else None,
             f"LoRA r={scale['lora']['r']}" if scale.get("lora") else None]
    return ", ".join(p for p in parts if p)


def device(gpu: bool):
    import torch

    return torch.device("cuda", 0) if gpu else torch.device("cpu")


def inputs(work: Path, size: dict, gpu: bool) -> dict:
    """The base model and every pipeline's data (built once, by the ``prepare`` step)."""
    import artifacts

    root = work / "inputs"
    base = artifacts.tiny_llama(root, name="tiny-llama", **size["arch"])
    d = size["distill"]
    return {
        "base": base,
        "router": artifacts.router_data(root, n_sample=size["router"]["n_sample"]),
        "arena": artifacts.arena_labelled(root),
        "selfplay": artifacts.kto_data(root, n_ids=size["selfplay"]["ids"]),
        "distill_data": artifacts.distill_data(root, base, max_len=d["max_len"], max_rows=d["rows"]),
        "student": artifacts.distill_student(root, base, size["rwkv_layers"], use_fla=gpu),
    }


def trainer_rate(history: list[dict]) -> tuple[int, float]:
    """(steps, seconds) of a Trainer run from its log history's summary row."""
    end = next(h for h in reversed(history) if "train_runtime" in h)
    return end["step"], end["train_runtime"]


def check_prepare(work: Path, size: dict, gpu: bool) -> dict:
    """Build the inputs (in a thread) while DeepSpeed compiles the ops the checks load (the compiler
    runs in processes of its own), so that no check's time holds a compilation. The compilation
    waits in this, the main thread: stopped at its time limit, it unwinds and releases torch's
    build lock (a lock left behind would hold up every later build of that op on the machine)."""
    import threading

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    got: dict = {}

    def build_inputs():
        try:
            got.update(inputs(work, size, gpu))
        except Exception as e:  # noqa: BLE001 - raised below, in the main thread
            got["error"] = e

    thread = threading.Thread(target=build_inputs, daemon=True)
    thread.start()
    built = build_deepspeed_ops(gpu)
    thread.join()
    if "error" in got:
        raise got["error"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(got["base"]))
    where = f"{torch.cuda.get_device_name(0)}, " if gpu else ""
    n = sum(p.numel() for p in model.parameters())
    # a build that failed fails the checks that need the op (with its error), not the others
    ops = (f"DeepSpeed ops {', '.join(built['ops'])} ready in {built['s']:.0f} s" if "error" not in built
           else f"DeepSpeed could not build {', '.join(built['ops'])}: {built['error']}")
    return {"note": f"{where}base model: a random Llama of {n / 1e6:.1f}M parameters, "
                    f"{model.config.num_hidden_layers} layers; student time-mix layers "
                    f"{size['rwkv_layers']}; {ops}"}


def build_deepspeed_ops(gpu: bool) -> dict:
    """Compile (or load from torch's extension cache) the DeepSpeed ops the checks use: CPU Adam for
    the offload configs, and on the CPU the shared-memory collectives. Cold, on 2 cores: ~5 min."""
    t0 = time.perf_counter()
    ops = ["CPUAdamBuilder"] + ([] if gpu else ["ShareMemCommBuilder"])
    built: dict = {"ops": ops}
    try:
        from deepspeed.accelerator import get_accelerator

        for op in ops:
            get_accelerator().create_op_builder(op).load()
    except Exception as e:  # noqa: BLE001 - reported by the caller
        built["error"] = f"{type(e).__name__}: {e}"
    return {**built, "s": time.perf_counter() - t0}


def check_router(work: Path, size: dict, gpu: bool) -> dict:
    from modelmake.files import read_json
    from modelmake.router.train import train_router

    got, s = inputs(work, size, gpu), size["router"]
    scale = cluster_scale("router", gpu)
    out, ckpt = work / "router" / "out", work / "router" / "ckpt"
    settings = {"epochs": 1, "lr": 1e-4, "batch_size": s["batch_size"], "max_length": s["max_length"],
                "save_steps": 10 ** 6, "logging_steps": 1}
    metrics = train_router(got["router"]["train"], got["router"]["calib"], got["base"], out, ckpt,
                           settings=settings, scale=scale, seed=0, config={})
    steps, seconds = trainer_rate(read_json(ckpt / "log_history.json"))
    note = f"{describe(scale)}; loss {metrics['train_loss']:.3f}"
    if scale.get("deepspeed"):  # as the workflow does it: in a process of its own, on the CPU
        done = subprocess.run([sys.executable, "-m", "modelmake", "router-consolidate", str(out), "--out",
                               str(work / "router" / "model")], capture_output=True, text=True,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        if done.returncode:
            print(done.stderr, flush=True)  # into the check's log
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"router-consolidate exited with {done.returncode}: {last}")
        note += "; ZeRO-3 checkpoint consolidated, every tensor as trained"
    return {"steps": steps, "seconds": seconds, "peak_bytes": peak(gpu), "note": note}


def check_arena(work: Path, size: dict, gpu: bool) -> dict:
    from modelmake.arena.stages import run_stage
    from modelmake.files import read_json

    got, s = inputs(work, size, gpu), size["arena"]
    scale = cluster_scale("arena", gpu)
    w = work / "arena"
    settings = {"template": {"max_length": s["max_length"], "head_share": 0.5}, "valid_fold": 0,
                "train": {"epochs": 1, "lr": 2e-4, "batch_size": s["batch_size"], "save_steps": 10 ** 6,
                          "max_steps": s["max_steps"]}}
    result = run_stage(init=str(got["base"]), labelled=str(got["arena"]), pseudo=[], out=str(w / "model"),
                       ckpt=str(w / "ckpt"), eval_out=str(w / "eval.parquet"), loss_png=str(w / "loss.png"),
                       settings=settings, seed=0, name="stage1", scale=scale)
    counts = read_json(w / "model" / "provenance.json")["counts"]
    return {"steps": counts["steps"], "seconds": counts["train_seconds"], "peak_bytes": peak(gpu),
            "note": f"{describe(scale)}; validation log-loss {result['log_loss']:.3f}"}


def check_selfplay(work: Path, size: dict, gpu: bool) -> dict:
    from modelmake.files import read_json
    from modelmake.selfplay.train import train_iteration

    got, s = inputs(work, size, gpu), size["selfplay"]
    scale = cluster_scale("selfplay", gpu)
    w = work / "selfplay"
    settings = {"beta": 0.1, "prior": 0.3, "learning_rate": 1e-4, "epochs": 1, "batch_size": s["batch_size"],
                "max_length": s["max_length"], "save_steps": 10 ** 6}
    counts = train_iteration(got["selfplay"], got["base"], w / "model", ckpt_dir=w / "ckpt",
                             settings=settings, seed=0, loss_png=w / "loss.png", scale=scale)
    steps, seconds = trainer_rate(read_json(w / "model" / "log_history.json"))
    return {"steps": steps, "seconds": seconds, "peak_bytes": peak(gpu),
            "note": f"{describe(scale)}; loss {counts['train_loss']:.3f}"}


def check_distill(work: Path, size: dict, gpu: bool) -> dict:
    import math

    from modelmake.distill.launch import run_stage
    from modelmake.files import read_json

    got, d = inputs(work, size, gpu), size["distill"]
    scale = cluster_scale("distill", gpu)
    w = work / "distill"
    settings = {"stage": 2, "steps": d["steps"], "batch_size": d["batch_size"], "max_len": d["max_len"],
                "lr": 1e-4, "warmup_steps": 1, "teacher_topk": d["topk"], "trainable": "rwkv",
                "save_every": 10 ** 6, "log_every": 1, "seed": 0, "collective_timeout_s": 120}
    job = {"settings": settings, "teacher": str(got["base"]), "student": str(got["student"]),
           "data": [str(p) for p in got["distill_data"]], "out": str(w / "model"),
           "plot": str(w / "loss.png"), "history": str(w / "history.json"), "ckpt": str(w / "ckpt"),
           "ready_dir": str(w / "ready"), "groups": 1, "ranks_per_group": 1, "teacher_mode": "local",
           "threads_per_process": os.cpu_count() or 1}
    if gpu:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")  # the launcher hands out the GPUs it is given
    run_stage(job, w / "logs", ready_timeout_s=60, scale=scale)
    timing = read_json(w / "model" / "timing.json")
    history = read_json(w / "history.json")
    losses = [h["loss"] for h in history]
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"non-finite losses: {losses}")
    fla = "time-mix through fla" if gpu else "time-mix in PyTorch"
    return {"steps": len(history), "seconds": timing["step_s"], "peak_bytes": timing["peak_memory_bytes"],
            "note": f"{describe(scale)}; teacher in-process on the same device; {fla}; "
                    f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"}


def check_fla(work: Path, size: dict, gpu: bool) -> dict:
    if not gpu:
        return {"status": "skip", "note": "--cpu: flash-linear-attention's Triton kernels need a GPU"}
    from modelmake.distill import hybrid

    if hybrid.chunk_rwkv6 is None:
        raise RuntimeError("flash-linear-attention does not import (fla.ops.rwkv6.chunk_rwkv6); "
                           "carry its wheels (bench/gpu_check_wheels.sh)")
    return {**fla_equivalence(device(gpu), **size["fla"]), "peak_bytes": peak(gpu)}


def fla_equivalence(dev, batch: int, heads: int, length: int, head_dim: int) -> dict:
    """fla's ``chunk_rwkv6`` (through ``hybrid.fla_rwkv6``) against ``hybrid.recurrence`` on ``dev``:

    * the op in fp32 on random inputs in the student's ranges: the output and the gradients of r, k,
      v, the log decay and the bonus, each as the RMS of the difference over the reference's RMS
      (fla's own tests' measure, ``fla.utils.testing.get_err_ratio``), at most 1e-2 (fla's chunked
      form reorders the sums; a wrong layout or decay is off by O(1));
    * the same op in bf16 against the fp32 reference (reported, not checked: training precision);
    * a hybrid student's logits with its time-mix layers through fla and through PyTorch, fp32:
      at most 2e-3 apart (the test suite's tolerance, tests/test_distill.py);
    * a forward + backward of the op each way, timed.

    Raises when a figure is out of tolerance; returns steps (fla forward + backward passes), seconds
    and a note with every figure."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from modelmake.distill import hybrid

    b, h, t, d = batch, heads, length, head_dim
    g = torch.Generator(device=dev).manual_seed(0)
    r, k, v = (torch.randn(b, h, t, d, device=dev, generator=g) for _ in range(3))
    k = k / d ** 0.5
    logw = -torch.exp(torch.empty(h, d, device=dev).uniform_(-6.0, -1.0, generator=g))  # TimeMix's decays
    u = torch.full((h, d), 0.5, device=dev)
    leaves = [x.requires_grad_() for x in (r, k, v, logw, u)]
    upstream = torch.randn(b, h, t, d, device=dev, generator=g)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def slow():
        return hybrid.recurrence(r, k, v, torch.exp(logw)[None, :, None, :].expand(b, -1, t, -1), u)[0]

    def fast():
        return hybrid.fla_rwkv6(r, k, v, logw, u)

    def run(fn):
        for x in leaves:
            x.grad = None
        y = fn()
        (y.float() * upstream).sum().backward()
        return y.detach(), [x.grad.detach().clone() for x in leaves]

    def timed(fn, n):
        run(fn)
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            run(fn)
        sync()
        return (time.perf_counter() - t0) / n

    y_ref, g_ref = run(slow)
    y_fla, g_fla = run(fast)
    errors = {"y": rel_error(y_fla, y_ref)}
    errors.update({name: rel_error(a, b_) for name, a, b_ in zip(("dr", "dk", "dv", "dlogw", "du"),
                                                                 g_fla, g_ref)})
    bad = {name: e for name, e in errors.items() if e > 1e-2}
    with torch.no_grad():
        y_bf16 = hybrid.fla_rwkv6(*(x.bfloat16() for x in (r, k, v)), logw, u.bfloat16())
    n_fla = 20
    s_fla, s_ref = timed(fast, n_fla), timed(slow, 2)

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    student = hybrid.from_teacher(LlamaForCausalLM(cfg).eval(), [0, 1]).to(dev).eval()
    ids = torch.randint(3, 97, (2, 133), device=dev)  # not a multiple of fla's chunk
    with torch.no_grad():
        plain = student(input_ids=ids).logits
        for tm in student.time_mixes():
            tm.use_fla = True
        with_fla = student(input_ids=ids).logits
    logits_diff = float((with_fla - plain).abs().max())
    if logits_diff > 2e-3:
        bad["logits"] = logits_diff
    note = (f"op [{b},{h},{t},{d}] fp32 rel. error " + " ".join(f"{n} {e:.1e}" for n, e in errors.items())
            + f", bf16 y {rel_error(y_bf16, y_ref):.1e}; student logits max |diff| {logits_diff:.1e}; "
              f"fwd+bwd fla {s_fla * 1e3:.2f} ms, PyTorch {s_ref * 1e3:.1f} ms ({s_ref / s_fla:.0f}x)")
    if bad:
        raise RuntimeError(f"fla differs from the recurrence beyond tolerance: {bad}. {note}")
    return {"steps": n_fla, "seconds": n_fla * s_fla, "note": note}


def rel_error(got, want) -> float:
    """RMS of the difference over the RMS of ``want``."""
    want = want.float()
    return float((got.float() - want).square().mean().sqrt() / want.square().mean().sqrt().clamp_min(1e-12))


def peak(gpu: bool) -> int:
    from modelmake.training import peak_memory_bytes

    return peak_memory_bytes(device(gpu))


def run_one(name: str, work: Path, gpu: bool) -> None:
    """One check in this process; its result (or the error) goes to ``<work>/<name>/result.json``."""
    import logging
    import traceback

    from modelmake.files import write_json

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # stopped at its time limit: unwind, so that a lock this process holds is released (torch's
    # extension builds leave a stale lock behind otherwise, and every later build waits on it)
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    size = SIZES["gpu" if gpu else "cpu"]
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    if gpu:
        import torch

        if not torch.cuda.is_available():
            write_json(folder / RESULT, {"status": "fail", "note": "torch sees no CUDA device (use --cpu)"})
            return
        torch.cuda.reset_peak_memory_stats()
    try:
        result = {"status": "ok", **globals()[f"check_{name}"](work, size, gpu)}
    except BaseException as e:  # noqa: BLE001 - every failure becomes the check's result
        traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0]
        result = {"status": "fail", "note": f"{type(e).__name__}: {first}"[:400]}
    write_json(folder / RESULT, result)


# --- the driver


def versions() -> dict:
    """What the check runs on (the libraries' versions, without importing the heavy ones twice)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "trl", "deepspeed", "peft", "accelerate", "datasets",
                 "flash-linear-attention", "triton"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def start(name: str, work: Path, cpu: bool) -> tuple[subprocess.Popen, Path]:
    log = work / f"{name}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--work", str(work)]
    cmd += ["--cpu"] if cpu else []
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=work, start_new_session=True)
    return proc, log


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the check's process group (the distillation launcher stops its ranks), SIGKILL after 15 s."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            pass


def run_check(name: str, work: Path, cpu: bool, timeout_s: float) -> dict:
    from modelmake.files import read_json
    from modelmake.procs import log_tail

    t0 = time.monotonic()
    if timeout_s < 5:
        return {"status": "fail", "note": "not run: the time budget is spent", "wall_s": 0.0}
    proc, log = start(name, work, cpu)
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop(proc)
        code = None
    wall = round(time.monotonic() - t0, 1)
    result_file = work / name / RESULT
    if code is None:
        result = {"status": "fail", "note": f"timed out after {timeout_s:.0f} s"}
    elif result_file.exists():
        result = read_json(result_file)
    else:
        result = {"status": "fail", "note": f"exited with code {code} and no result"}
    if code not in (0, None) and result["status"] == "ok":
        result = {**result, "status": "fail", "note": f"exited with code {code} after its result"}
    if result["status"] == "fail":
        result["log_tail"] = log_tail(log, 25)
    return {**result, "wall_s": wall}


def human_bytes(n: int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def line(name: str, r: dict) -> str:
    rate = f"{r['steps'] / r['seconds']:.2f}" if r.get("steps") and r.get("seconds") else "-"
    return (f"{name:<9} {r['status']:<5} {r.get('steps') or '-':>5} {rate:>8} "
            f"{human_bytes(r.get('peak_bytes')):>10} {r['wall_s']:>7.1f}  {r.get('note', '')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="See the module docstring.")
    ap.add_argument("--cpu", action="store_true",
                    help="run on the CPU in fp32 (fla skipped): the test suite's mode")
    ap.add_argument("--only", nargs="+", choices=CHECKS, help="run these checks only")
    ap.add_argument("--work", help="the working folder, kept (default: a temporary one, removed)")
    ap.add_argument("--report", help="copy summary.json and every check's log into this folder")
    ap.add_argument("--budget-s", type=float,
                    help="the whole run's time limit (default: 420 on a GPU, 900 with --cpu)")
    ap.add_argument("--one", choices=("prepare", *CHECKS), help=argparse.SUPPRESS)  # internal: one check
    args = ap.parse_args()
    if args.one:
        return run_one(args.one, Path(args.work), gpu=not args.cpu)

    size = SIZES["cpu" if args.cpu else "gpu"]
    budget = args.budget_s or size["budget_s"]
    deadline = time.monotonic() + budget
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    info = {"mode": "cpu" if args.cpu else "gpu", "host": platform.node(), **versions()}
    print("gpu_check:", json.dumps(info), flush=True)
    results: dict[str, dict] = {}
    try:
        left = lambda name: min(size["timeout_s"][name], deadline - time.monotonic())  # noqa: E731
        prep = run_check("prepare", work, args.cpu, left("prepare"))
        print(f"inputs: {prep['status']} in {prep['wall_s']} s; {prep.get('note', '')}", flush=True)
        for name in args.only or CHECKS:
            if prep["status"] != "ok":
                results[name] = {"status": "fail", "note": "not run: no inputs", "wall_s": 0.0}
            else:
                results[name] = run_check(name, work, args.cpu, left(name))
            print(line(name, results[name]), flush=True)
            if results[name].get("log_tail"):
                print("  " + results[name]["log_tail"].replace("\n", "\n  "), flush=True)
        if prep["status"] != "ok":
            print("  " + prep.get("log_tail", "").replace("\n", "\n  "), flush=True)
        failed = [n for n, r in results.items() if r["status"] == "fail"]
        print(f"\nsummary ({info['mode']}, torch {info['torch']}, {budget:.0f} s budget):")
        print(f"{'check':<9} {'state':<5} {'steps':>5} {'steps/s':>8} {'peak mem':>10} {'wall s':>7}  "
              f"details")
        for name, r in results.items():
            print(line(name, r))
        print(f"{len(results) - len(failed)} of {len(results)} checks passed or skipped"
              + (f"; FAILED: {', '.join(failed)}" if failed else "")
              + ("; building the inputs failed" if prep["status"] != "ok" else ""), flush=True)
        if args.report:
            report = Path(args.report)
            report.mkdir(parents=True, exist_ok=True)
            (report / "summary.json").write_text(json.dumps({"info": info, "inputs": prep, "checks": results},
                                                            indent=1, default=str))
            for name in ("prepare", *results):
                if (work / f"{name}.log").exists():
                    shutil.copy(work / f"{name}.log", report / f"{name}.log")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
