"""Benchmark of the router's SFT training step on the CPU, against TRL's defaults, in one run.

The baseline is the router training as TRL and torch would run it left alone: ``SFTConfig``'s
default gradient checkpointing on, deterministic mode's NaN fill of every ``torch.empty``
(``torch.utils.deterministic.fill_uninitialized_memory``) and TRL's fused LM head at every position.
The tuned variant is what ``modelmake router-train`` does (the first two off, the LM head at the
answer positions only: ``lm_head.compact_lm_head``). Each variant trains the same steps from the
same seed in its own process (rounds interleaved, so machine load hits both); the Trainer's
``train_runtime`` is the measure (model loading and tokenisation excluded). The final training
losses must agree (relative 1e-5): no setting changes the arithmetic, the LM head only its float
rounding.

Inputs default to the demo's data and base (build them first:
snakemake results/router/demo/data/train.parquet results/assets/models/tiny-llama).
Run: python bench/bench_router.py [--epochs 1] [--rounds 2] [--out bench.json]
     python bench/bench_router.py --smoke   # 1 round of 2 steps on a tiny base and router data it builds
                                            # in a temporary folder (runs end to end; measures nothing)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import common

REPO = common.REPO
sys.path.insert(0, str(REPO / "src"))

VARIANTS = ("trl_defaults", "modelmake")


def train_once(args) -> None:
    """One training in this process; emits {runtime_s, steps, train_loss}."""
    import modelmake.lm_head as lm_head
    import modelmake.training as training
    from modelmake.files import read_json
    from modelmake.router.train import train_router

    settings = {"epochs": args.epochs, "lr": 0.003, "batch_size": 16, "max_length": 256,
                "save_steps": 10 ** 6, "logging_steps": 10}
    scale = {"gradient_checkpointing": False}
    if args.variant == "trl_defaults":
        scale["gradient_checkpointing"] = True
        seed = training.seed_everything

        def seed_with_fill(*a, **k):
            import torch.utils.deterministic

            seed(*a, **k)
            torch.utils.deterministic.fill_uninitialized_memory = True  # torch's default

        training.seed_everything = seed_with_fill
        lm_head.compact_lm_head = lambda *a, **k: None  # TRL's own LM head
    work = Path(args.work)
    train_router(args.train, args.eval, args.base, work / "model", work / "ckpt", settings=settings,
                 scale=scale, seed=0, config={})
    end = read_json(work / "ckpt" / "log_history.json")[-1]
    common.emit({"runtime_s": end["train_runtime"], "steps": end["step"], "train_loss": end["train_loss"]})


def smoke_inputs(args, root: Path) -> None:
    """--smoke: a 1-step tiny-llama base and ~30 training rows (2 steps of 16), 1 round."""
    import artifacts

    data = artifacts.router_data(root, n_sample=48)
    args.train, args.eval = str(data["train"]), str(data["calib"])
    args.base = str(artifacts.tiny_llama(root, steps=1))
    args.epochs, args.rounds = 1.0, 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", default="results/router/demo/data/train.parquet")
    p.add_argument("--eval", default="results/router/demo/data/calib.parquet")
    p.add_argument("--base", default="results/assets/models/tiny-llama")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the rows and the ratio as JSON here")
    p.add_argument("--smoke", action="store_true",
                   help="1 round of a few steps on a tiny base and router data built in a temporary folder")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one training
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        return train_once(args)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            smoke_inputs(args, Path(tmp) / "inputs")
        for r in range(args.rounds):
            for variant in VARIANTS:
                work = Path(tmp) / f"{variant}{r}"
                cmd = [sys.executable, __file__, "--variant", variant, "--work", str(work), "--train", args.train,
                       "--eval", args.eval, "--base", args.base, "--epochs", str(args.epochs)]
                row = {"variant": variant, "round": r, **common.child(cmd, variant, threads=args.threads)}
                row["s_per_step"] = round(row["runtime_s"] / row["steps"], 4)
                print(json.dumps(row), flush=True)
                rows.append(row)
    med = {v: statistics.median(r["s_per_step"] for r in rows if r["variant"] == v) for v in VARIANTS}
    losses = [r["train_loss"] for r in rows]
    result = {"rows": rows, "median_s_per_step": med,
              "speedup_vs_trl_defaults": round(med["trl_defaults"] / med["modelmake"], 3),
              "same_final_loss": all(math.isclose(x, losses[0], rel_tol=1e-5) for x in losses)}
    print(f"router SFT step on CPU: TRL defaults {med['trl_defaults']:.3f} s, modelmake {med['modelmake']:.3f} s: "
          f"{result['speedup_vs_trl_defaults']:.2f}x; same final loss: {result['same_final_loss']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.smoke:
        print(common.SMOKE_NOTE)
    if not result["same_final_loss"]:
        sys.exit(f"the variants trained to different losses: {sorted(losses)}")


if __name__ == "__main__":
    main()
