"""Benchmark of the teacher service, measured side by side in one run.

1. Training step rate of stage 2 with the remote teacher service (1 group: a teacher process and
   one trainer, Gloo) over the same training computing the teacher's outputs in-process, as a
   ratio (target >= 0.9). Step time is measured inside the trainer (batch, teacher outputs,
   forward, backward, step), process start-up excluded.
2. Teacher throughput (tokens per second of teacher forward, and trainer steps per second) as the
   ranks per group grow: one teacher batching 1, 2, 4 trainers' requests into one forward.

Inputs default to the demo's results (build them first: snakemake results/distill/demo/eval/metrics.json).
Run: python bench/bench_distill.py [--steps 30] [--ranks 1 2 4]
     python bench/bench_distill.py --smoke   # 3 steps, ranks [1], on a 1-step teacher, its student and
                                             # chat data built in a temporary folder (measures nothing)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import common

REPO = common.REPO
sys.path.insert(0, str(REPO / "src"))

from modelmake.distill.launch import run_stage  # noqa: E402


def job(args, tmp: Path, name: str, mode: str, ranks: int) -> dict:
    s = {"stage": 2, "steps": args.steps, "batch_size": args.batch_size, "max_len": args.max_len, "lr": 1e-3,
         "weight_decay": 0.0, "warmup_steps": 1, "kl_weight": 1.0, "ce_weight": 0.5, "temperature": 2.0,
         "teacher_topk": args.topk, "trainable": "rwkv", "save_every": 10 ** 6, "log_every": 10 ** 6, "seed": 0,
         "collective_timeout_s": 120, "grad_clip": 1.0, "deepspeed": None}
    out = tmp / name
    return {"settings": s, "teacher": args.teacher, "student": args.student, "data": args.data,
            "out": str(out / "model"), "plot": str(out / "loss.png"), "history": str(out / "h.json"),
            "ckpt": str(out / "ckpt"), "ready_dir": str(out / "ready"), "groups": 1, "ranks_per_group": ranks,
            "teacher_mode": mode, "threads_per_process": args.threads}


def measure(args, tmp: Path, name: str, mode: str, ranks: int) -> dict:
    j = job(args, tmp, name, mode, ranks)
    t0 = time.perf_counter()
    run_stage(j, tmp / name / "logs", 300)
    wall = time.perf_counter() - t0
    timing = json.loads((Path(j["out"]) / "timing.json").read_text())
    row = {"name": name, "mode": mode, "ranks": ranks, "steps": args.steps, "wall_s": round(wall, 2),
           "step_s": timing["step_s"], "steps_per_s": round(args.steps / timing["step_s"], 3),
           "teacher_wait_s": timing["teacher_s"]}
    stats = Path(j["ckpt"]) / "teacher_group0.stats.json"
    if stats.exists():
        st = json.loads(stats.read_text())
        row.update(teacher_tokens=st["tokens"], teacher_busy_s=st["busy_s"],
                   teacher_tokens_per_s=round(st["tokens"] / max(st["busy_s"], 1e-9), 1),
                   group_tokens_per_s=round(st["tokens"] / timing["step_s"], 1))
    print(json.dumps(row), flush=True)
    return row


def smoke_inputs(args, root: Path) -> None:
    """--smoke: the demo's tiny-llama fitted 1 step as the teacher, its hybrid student (layer 1 a
    time-mix, as the demo's) and 24 chat rows of 32 tokens; 3 steps of batch 2, ranks [1]."""
    import artifacts

    teacher = artifacts.tiny_llama(root, steps=1)
    args.teacher = str(teacher)
    args.student = str(artifacts.distill_student(root, teacher, rwkv_layers=[1]))
    args.steps, args.batch_size, args.max_len, args.topk, args.ranks = 3, 2, 32, 8, [1]
    args.data = [str(p) for p in artifacts.distill_data(root, teacher, max_len=args.max_len, max_rows=24)]


def main() -> None:
    root = REPO / "results/distill/demo"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=str(REPO / "results/assets/models/tiny-llama"))
    ap.add_argument("--student", default=str(root / "stage1/model"))
    ap.add_argument("--data", nargs="+", default=[str(root / "data/chat/train.parquet"),
                                                  str(root / "data/web/train.parquet")])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=96)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--out", help="write the rows and ratios as JSON here")
    ap.add_argument("--smoke", action="store_true",
                    help="3 steps, ranks [1], on a teacher, student and data built in a temporary folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_distill_") as d:
        tmp = Path(d)
        if args.smoke:
            smoke_inputs(args, tmp / "inputs")
        local = measure(args, tmp, "local", "local", 1)
        remote = measure(args, tmp, "service", "service", 1)
        scaling = [remote] + [measure(args, tmp, f"service_r{r}", "service", r) for r in args.ranks if r != 1]
    ratio = remote["steps_per_s"] / local["steps_per_s"]
    print(f"step rate, remote teacher service / in-process teacher: {ratio:.3f} "
          f"({remote['steps_per_s']} vs {local['steps_per_s']} steps/s; target >= 0.9)")
    base = scaling[0]["teacher_tokens_per_s"]
    for r in scaling:
        print(f"ranks per group {r['ranks']}: teacher {r['teacher_tokens_per_s']} tokens/s in forward "
              f"({r['teacher_tokens_per_s'] / base:.2f}x of 1 rank), group {r['group_tokens_per_s']} tokens/s "
              f"end to end, {r['steps_per_s']} steps/s per rank")
    if args.out:
        Path(args.out).write_text(json.dumps({"ratio_service_over_local": ratio, "rows": [local, *scaling]}, indent=2))
    if args.smoke:
        print(common.SMOKE_NOTE)


if __name__ == "__main__":
    main()
