"""Benchmark: each training pipeline's step against a plain PyTorch loop over the same model and batches.

For every pipeline of --pipelines, on the demo's base (tiny-llama) and the demo's settings:

  router    ``router.train.train_router``: TRL's SFTTrainer, loss on the [[k]] answer;
  arena     ``arena.model.train``: the HF Trainer, a two-class head on soft targets (stage 1's settings);
  selfplay  ``selfplay.train.train_iteration``: TRL's KTOTrainer with the nnPU loss and a reference model;
  distill   ``distill.launch.run_stage``: modelmake's own loop, stage 2 (KL to the teacher's top k + CE),
            one trainer with the teacher in-process (``teacher_mode: local``).

  pipeline  the pipeline's own function, stopped after --steps optimizer steps;
  plain     a loop written here in plain PyTorch: the forward, the pipeline's loss (the same formula),
            backward, ``clip_grad_norm_`` where the pipeline clips, the same optimizer (class and
            settings), ``zero_grad``; ``use_cache=False``, no scheduler, logging or metrics.

Both sides start from the same weights and step on the same batches: the pipeline's process records
them (the weights when training starts, every batch its trainer steps on; distillation's batches
are its seeded ``Batches``) and the plain process replays them; their losses must agree step by step.
Measured: tokens/s, non-padding tokens of the batches over the seconds of steps 2..N, each step timed
from the previous step's end (model loading, tokenisation, data loader set-up, evaluation,
checkpoints and the model folder excluded; distillation: the step timestamps of its trainer log),
each side in a process of its own with --threads torch threads, rounds interleaved, the best time
of the rounds per step. Issue 17's target: the pipeline >= 0.8 of the plain loop's tokens/s.

The same formula is not always the same work: on a CPU the router's and self-play's pipelines run
the LM head only at the positions their loss scores (``lm_head.compact_lm_head``: the router's
[[k]] answers, two tokens per example; self-play's completions), the plain loop at every position.

--base-sizes H [H ...] measures on bases built here instead (tiny-llama's architecture at hidden
size H: intermediate 2H, H/32 heads, H/64 key-value heads, fitted for one step) and prints each
pipeline's ratio by H: what a step costs besides the model's compute (the trainer's, the data
loader's) stays the same as the model grows, so a ratio held down by it rises toward 1.

Inputs: the demo's tiny-llama under --assets (build it first:
snakemake --cores all results/assets/models/tiny-llama); each pipeline's data is built in a
temporary folder from resources/demo with the library's own functions (bench/artifacts.py).
Run: python bench/bench_train.py [--pipelines router arena selfplay distill] [--steps 30] [--rounds 3]
     python bench/bench_train.py --base-sizes 128 256 512 [--steps 10]   # the ratios as the base grows
     python bench/bench_train.py --smoke   # 3 steps, 1 round, on a 1-step tiny-llama and small data built
                                           # in a temporary folder (runs end to end; measures nothing)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import common

REPO = common.REPO
sys.path.insert(0, str(REPO / "src"))

PIPELINES = ("router", "arena", "selfplay", "distill")
WHAT = {"router": "TRL SFTTrainer", "arena": "HF Trainer", "selfplay": "TRL KTOTrainer, nnPU",
        "distill": "modelmake's loop, stage 2"}
SIDES = ("pipeline", "plain")
LOSS_TOLERANCE = 1e-3  # relative (absolute below 1), per step


# --- inputs -----------------------------------------------------------------------------------------

def base_arch(hidden: int) -> dict:
    """tiny-llama's architecture (config.yaml's assets.models) at hidden size ``hidden``, fitted for one step."""
    if hidden < 64 or hidden % 64:
        sys.exit(f"--base-sizes: {hidden} is not a multiple of 64 (heads of 32, at least two of them)")
    return {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_heads": hidden // 32,
            "num_kv_heads": hidden // 64, "steps": 1}


def build_inputs(args, root: Path, hidden: int | None = None) -> dict:
    """Paths and settings every side reads (written to ``inputs.json``): the demo's settings, --steps;
    ``hidden``: on a base of that hidden size built under ``root`` (``base_arch``), not --assets'."""
    import artifacts
    from modelmake.config import fill_defaults

    demo = artifacts.demo_config()
    if args.smoke:
        base = artifacts.tiny_llama(root, steps=1)
        n_sample, n_ids, rows, max_len = 48, 12, 24, 32
    else:
        base = Path(args.assets) / "models" / "tiny-llama"
        if hidden is not None:
            base = artifacts.tiny_llama(root, f"tiny-llama-h{hidden}", asset="tiny-llama", **base_arch(hidden))
        elif not (base / "config.json").exists():
            sys.exit(f"{base} is missing: build it first (snakemake --cores all results/assets/models/tiny-llama) "
                     f"or point --assets at the folder holding models/tiny-llama")
        n_sample, n_ids = demo["router"]["n_sample"], 8 * args.steps
        rows, max_len = demo["distill"]["chat"]["max_rows"], demo["distill"]["max_len"]
    router = artifacts.router_data(root, n_sample=n_sample)
    distill = fill_defaults("$defs.distill_stage", {**demo["distill"]["stage2"], "steps": args.steps,
                                                    "save_every": 10 ** 6, "log_every": 1})
    distill.update(stage=2, seed=demo["seed"], max_len=max_len, collective_timeout_s=120)
    if args.smoke:
        distill.update(batch_size=2, teacher_topk=8)
    return {
        "steps": args.steps, "base": str(base), "seed": demo["seed"],
        "router": {"train": str(router["train"]), "eval": str(router["calib"]),
                   "settings": {**demo["router"]["train"], "epochs": 100, "save_steps": 10 ** 6}},
        "arena": {"labelled": str(artifacts.arena_labelled(root)), "template": demo["arena"]["template"],
                  "valid_fold": demo["arena"]["valid_fold"],
                  "settings": {**demo["arena"]["stage1"], "epochs": 100, "save_steps": 10 ** 6,
                               "max_steps": args.steps}},
        "selfplay": {"data": str(artifacts.kto_data(root, n_ids=n_ids)),
                     "settings": {**demo["selfplay"]["train"], "epochs": 100, "save_steps": 10 ** 6}},
        "distill": {"data": [str(p) for p in artifacts.distill_data(root, base, max_len=max_len, max_rows=rows)],
                    "student": str(artifacts.distill_student(root / base.name, base,
                                                             demo["distill"]["student"]["rwkv_layers"])),
                    "settings": distill},
    }


# --- the pipeline side: the pipeline's own function, recorded ----------------------------------------

def snapshot(model) -> dict | None:
    """What rebuilds ``model`` as it is now: class, config, a copy of the weights, the trainable names."""
    if model is None:
        return None
    return {"cls": type(model), "config": model.config,
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "trainable": [n for n, p in model.named_parameters() if p.requires_grad]}


def record_hf_trainer(steps: int) -> dict:
    """Hook transformers' Trainer (every pipeline's trainer derives from it): stop after ``steps``
    optimizer steps, mark the end of each (``on_step_end``) and any evaluation or checkpoint, and
    record the weights at the start, the optimizer, every batch, learning rate and loss."""
    import transformers

    rec: dict = {"batches": [], "losses": [], "lrs": [], "ends": [], "excluded": []}
    trainer = transformers.Trainer
    train, training_step = trainer.train, trainer.training_step

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            rec["ends"].append(time.perf_counter())
            if state.global_step >= steps:
                control.should_training_stop = True

    def hooked_train(self, *a, **k):
        rec["model"], rec["ref"] = snapshot(self.model), snapshot(getattr(self, "ref_model", None))
        self.add_callback(Clock())
        return train(self, *a, **k)

    def hooked_step(self, model, inputs, *a, **k):
        batch = dict(inputs)  # before the trainer's compute_loss pops from it
        opt = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper
        rec["lrs"].append([g["lr"] for g in opt.param_groups])  # this step's, set by the scheduler
        loss = training_step(self, model, inputs, *a, **k)
        rec["batches"].append(batch)
        rec["losses"].append(loss.detach())
        if "optimizer" not in rec:
            names = {id(p): n for n, p in self.model.named_parameters()}
            rec["optimizer"] = {"cls": type(opt).__name__, "defaults": dict(opt.defaults),
                                "groups": [{**{k: v for k, v in g.items() if k != "params"},
                                            "names": [names[id(p)] for p in g["params"]]} for g in opt.param_groups]}
            rec["max_grad_norm"] = self.args.max_grad_norm
        return loss

    def excluded(name):
        run = getattr(trainer, name)

        def timed(self, *a, **k):
            t = time.perf_counter()
            try:
                return run(self, *a, **k)
            finally:
                rec["excluded"].append((t, time.perf_counter()))
        setattr(trainer, name, timed)

    trainer.train, trainer.training_step = hooked_train, hooked_step
    for name in ("_evaluate", "_save_checkpoint"):
        excluded(name)
    return rec


def run_pipeline(name: str, inp: dict, work: Path) -> dict:
    """Run the pipeline's own training; return seconds, steps, tokens and the first loss, and (for the
    HF-based ones) write what the plain side replays to work/record.pt."""
    if name == "distill":
        return run_distill(inp, work)
    import torch

    rec = record_hf_trainer(inp["steps"])
    seed, p = inp["seed"], inp[name]
    if name == "router":
        from modelmake.router.train import train_router

        train_router(p["train"], p["eval"], inp["base"], work / "model", work / "ckpt", settings=p["settings"],
                     scale=None, seed=seed, config={})
    elif name == "arena":
        import pandas as pd

        from modelmake.arena.model import TrainSettings, train
        from modelmake.arena.stages import training_data
        from modelmake.arena.template import TemplateSettings

        s = TrainSettings(**p["settings"])
        train_df, _ = training_data(pd.read_parquet(p["labelled"]), [], p["valid_fold"], s.label_smoothing)
        train(inp["base"], train_df, work / "ckpt", TemplateSettings(**p["template"]), s, seed, "bench", None)
    elif name == "selfplay":
        from modelmake.selfplay.train import train_iteration

        train_iteration(p["data"], inp["base"], work / "model", ckpt_dir=work / "ckpt", settings=p["settings"],
                        seed=seed, loss_png=work / "loss.png")
    torch.save({k: rec[k] for k in ("model", "ref", "batches", "lrs", "optimizer", "max_grad_norm")},
               work / "record.pt")
    return measured(rec["ends"], [batch_tokens(b) for b in rec["batches"]], rec["losses"], rec["excluded"])


def measured(ends: list[float], tokens: list[int], losses: list, excluded=()) -> dict:
    """A side's result: the time of steps 2..N, each from the previous step's end to its own (less any
    ``excluded`` (start, end) stretch in between: evaluation, checkpoints), their tokens, every loss."""
    steps = [b - a - sum(max(0.0, min(b, y) - max(a, x)) for x, y in excluded) for a, b in zip(ends, ends[1:])]
    return {"steps": len(ends), "step_s": steps, "step_tokens": tokens[1:len(ends)],
            "losses": [float(x) for x in losses]}


def distill_job(inp: dict, work: Path, threads: int) -> dict:
    p = inp["distill"]
    return {"settings": p["settings"], "teacher": inp["base"], "student": p["student"], "data": p["data"],
            "out": str(work / "model"), "plot": str(work / "loss.png"), "history": str(work / "history.json"),
            "ckpt": str(work / "ckpt"), "ready_dir": str(work / "ready"), "groups": 1, "ranks_per_group": 1,
            "teacher_mode": "local", "threads_per_process": threads}


def run_distill(inp: dict, work: Path) -> dict:
    """The stage's supervisor and its one trainer process; a step ends where the trainer logs it
    (``log_every: 1``, the schema's default: "step N" at the end of every step, millisecond stamps)."""
    from datetime import datetime

    from modelmake.distill.launch import run_stage

    job = distill_job(inp, work, inp["threads"])
    run_stage(job, work / "logs", 300)
    stamped = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO \S+: step (\d+) ")
    ends = [datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            for m in map(stamped.match, (work / "logs" / "trainer0.log").read_text().splitlines()) if m]
    history = json.loads((work / "history.json").read_text())
    return measured(ends, [int(mask.sum()) for _, mask, _ in distill_batches(inp)], [h["loss"] for h in history])


def distill_batches(inp: dict) -> list:
    """The (ids, mask, labels) the stage's one trainer steps on, in order (its seeded ``Batches``)."""
    from modelmake.distill.data import load_rows
    from modelmake.distill.train import Batches

    s = inp["distill"]["settings"]
    batches = Batches(load_rows(inp["distill"]["data"]), s["batch_size"], 1, 0, s["seed"])
    return [batches(step) for step in range(inp["steps"])]


# --- the plain side ----------------------------------------------------------------------------------

def batch_tokens(batch: dict) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def rebuild(snap: dict | None):
    if snap is None:
        return None
    model = snap["cls"](snap["config"])
    model.load_state_dict(snap["state"])
    trainable = set(snap["trainable"])
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    return model


def sequence_logps(model, batch):
    """Sum of the completion tokens' log-probabilities per sequence (what KTO compares)."""
    import torch

    ids = batch["input_ids"]
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False).logits[:, :-1]
    target = ids[:, 1:]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return (logp * batch["completion_mask"][:, 1:]).sum(-1)


def plain_loss(name: str, settings: dict, model, ref, batch):
    """The pipeline's loss on ``batch``, written plainly."""
    import torch

    if name == "router":
        return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                     labels=batch["labels"], use_cache=False).loss
    if name == "arena":
        from modelmake.arena.model import soft_cross_entropy

        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return soft_cross_entropy(logits, batch["soft_labels"])
    from modelmake.selfplay.loss import nnpu_kto_loss
    from modelmake.selfplay.train import train_settings

    s = train_settings(settings)
    policy = sequence_logps(model, batch)
    with torch.no_grad():
        reference = sequence_logps(ref, batch)
    return nnpu_kto_loss(policy, reference, batch["label"], beta=s["beta"], prior=s["prior"], gamma=s["gamma"],
                         desirable_weight=s["desirable_weight"], undesirable_weight=s["undesirable_weight"]).loss


def optimizer(spec: dict, model):
    """The trainer's optimizer: its ``torch.optim`` class, settings and parameter groups, over ``model``."""
    import inspect

    import torch

    cls = getattr(torch.optim, spec["cls"])
    accepted = inspect.signature(cls).parameters
    named = dict(model.named_parameters())
    groups = [{**{k: v for k, v in g.items() if k in accepted}, "params": [named[n] for n in g["names"]]}
              for g in spec["groups"]]
    return cls(groups, **{k: v for k, v in spec["defaults"].items() if k in accepted})


def run_plain(name: str, inp: dict, record: Path) -> dict:
    import torch

    if name == "distill":
        return plain_distill(inp)
    rec = torch.load(record, weights_only=False)
    model, ref = rebuild(rec["model"]), rebuild(rec["ref"])
    model.train()
    if ref is not None:
        ref.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(rec["optimizer"], model)
    clip, settings, losses, ends = rec["max_grad_norm"], inp[name]["settings"], [], []
    for batch, lrs in zip(rec["batches"], rec["lrs"]):
        for group, lr in zip(opt.param_groups, lrs):
            group["lr"] = lr
        loss = plain_loss(name, settings, model, ref, batch)
        loss.backward()
        if clip and clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        ends.append(time.perf_counter())
    return measured(ends, [batch_tokens(b) for b in rec["batches"]], losses)


def plain_distill(inp: dict) -> dict:
    """Stage 2 plainly: the teacher's top-k logits (no grad), the student's forward, KL + CE, backward,
    clip, AdamW over the trainable (time-mix) parameters."""
    import torch
    from transformers import AutoModelForCausalLM

    from modelmake.distill import hybrid, losses
    from modelmake.distill.train import lr_at, trainable_parameters
    from modelmake.training import seed_everything

    hybrid.register()
    s = inp["distill"]["settings"]
    seed_everything(s["seed"], deterministic=False)
    student = AutoModelForCausalLM.from_pretrained(inp["distill"]["student"])
    teacher = AutoModelForCausalLM.from_pretrained(inp["base"]).eval()
    params = trainable_parameters(student, s["trainable"])
    opt = torch.optim.AdamW(params, lr=s["lr"], weight_decay=s["weight_decay"])
    batches = distill_batches(inp)
    student.train()
    out, ends = [], []
    for step, (ids, mask, labels) in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s)
        with torch.no_grad():
            top = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits.topk(s["teacher_topk"], dim=-1)
        logits = student(input_ids=ids, attention_mask=mask, use_cache=False).logits
        loss = (s["kl_weight"] * losses.kl_to_teacher(logits, tuple(top), labels, s["temperature"])
                + s["ce_weight"] * losses.ce(logits, labels))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(loss.detach())
        ends.append(time.perf_counter())
    return measured(ends, [int(m.sum()) for _, m, _ in batches], out)


# --- the parent ---------------------------------------------------------------------------------------

def side(args) -> None:
    """One side of one pipeline in this process (internal: --side)."""
    import torch

    torch.set_num_threads(args.threads)
    inp = {**json.loads(Path(args.inputs).read_text()), "threads": args.threads}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.side == "pipeline":
        row = run_pipeline(args.side_pipeline, inp, work)
    else:
        row = run_plain(args.side_pipeline, inp, Path(args.record))
    common.emit(row)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipelines", nargs="+", choices=PIPELINES, default=list(PIPELINES))
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per side")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads of each side")
    p.add_argument("--assets", default=str(REPO / "results/assets"), help="the folder holding models/tiny-llama")
    p.add_argument("--base-sizes", type=int, nargs="+", metavar="H",
                   help="measure on tiny-llamas of these hidden sizes, built here (not --assets'), and print the "
                        "ratios by size")
    p.add_argument("--out", help="write the rows and ratios as JSON here")
    p.add_argument("--smoke", action="store_true",
                   help="3 steps, 1 round, on a base and data built in a temporary folder")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: one side in this process
    p.add_argument("--side-pipeline", choices=PIPELINES, help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--record", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        return side(args)
    if args.smoke:
        args.steps, args.rounds = 3, 1

    rows, summary = [], {}
    sizes = args.base_sizes or [None]
    with tempfile.TemporaryDirectory(prefix="bench_train_") as d:
        tmp = Path(d)
        for hidden in sizes:
            here = tmp if hidden is None else tmp / f"h{hidden}"
            here.mkdir(parents=True, exist_ok=True)
            inputs = here / "inputs.json"
            inputs.write_text(json.dumps(build_inputs(args, tmp / "inputs", hidden)))
            for name in args.pipelines:
                for r in range(args.rounds):
                    for s in SIDES:
                        work = here / name / f"{s}{r}"
                        cmd = [sys.executable, __file__, "--side", s, "--side-pipeline", name, "--inputs",
                               str(inputs), "--work", str(work), "--record",
                               str(here / name / "pipeline0" / "record.pt"), "--threads", str(args.threads)]
                        what = f"{name} {s} round {r}" + (f" (base hidden {hidden})" if hidden else "")
                        row = {"pipeline": name, "side": s, "round": r, "base_hidden": hidden,
                               **common.child(cmd, what, threads=args.threads)}
                        row["seconds"] = sum(row["step_s"])
                        row["tok_s"] = sum(row["step_tokens"]) / row["seconds"]
                        print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()
                                          if k not in ("losses", "step_s", "step_tokens")}), flush=True)
                        rows.append(row)
                summary[key(name, hidden)] = summarise([r for r in rows if (r["pipeline"], r["base_hidden"])
                                                        == (name, hidden)])
    print()
    for hidden in sizes:
        for name in args.pipelines:
            s = summary[key(name, hidden)]
            print(f"{name} training step ({WHAT[name]}{f', base hidden {hidden}' if hidden else ''}): pipeline "
                  f"{s['pipeline_tok_s']:.0f} tok/s, plain loop {s['plain_tok_s']:.0f} tok/s (steps 2-{s['steps']}, "
                  f"{s['tokens']} tokens): ratio {s['ratio']:.3f}"
                  + ("" if args.smoke else f" (target >= 0.8: {'met' if s['ratio'] >= 0.8 else 'MISSED'})")
                  + f"; losses of every step agree: {s['same_losses']} (largest difference {s['loss_diff']:.1e})")
    if args.base_sizes:
        print("\nratio by the base's hidden size (ms per step: pipeline - plain loop = what the pipeline adds):")
        for name in args.pipelines:
            by_size = [(h, summary[key(name, h)]) for h in sizes]
            print(f"  {name}: " + ", ".join(f"{h}: {s['ratio']:.3f} ({s['pipeline_ms']:.1f} - {s['plain_ms']:.1f} "
                                            f"= {s['pipeline_ms'] - s['plain_ms']:+.1f})" for h, s in by_size))
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    if args.smoke:
        print(common.SMOKE_NOTE)
    bad = [n for n, s in summary.items() if not s["same_losses"]]
    if bad:
        sys.exit(f"the plain loop did not train as the pipeline did (the losses differ): {', '.join(bad)}")


def key(name: str, hidden: int | None) -> str:
    """A summary's key: the pipeline's name, with the base's hidden size under --base-sizes."""
    return name if hidden is None else f"{name}@h{hidden}"


def summarise(rows: list[dict]) -> dict:
    """Each side's tokens/s over steps 2..N, each step's time the best of the rounds (another process's
    burst only ever adds time), their ratio, and whether the two sides' losses (round 0) agree step by
    step: the same start, batches and updates (up to float rounding: TRL's fused log-probabilities)."""
    best = {s: [min(t) for t in zip(*(r["step_s"] for r in rows if r["side"] == s))] for s in SIDES}
    tokens = sum(rows[0]["step_tokens"])
    tok_s = {s: tokens / sum(best[s]) for s in SIDES}
    losses = {s: next(r["losses"] for r in rows if r["side"] == s) for s in SIDES}
    diff = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(losses["pipeline"], losses["plain"]))
    return {"pipeline_tok_s": tok_s["pipeline"], "plain_tok_s": tok_s["plain"],
            **{f"{s}_ms": 1000 * sum(best[s]) / len(best[s]) for s in SIDES},
            "ratio": tok_s["pipeline"] / tok_s["plain"], "steps": rows[0]["steps"], "tokens": tokens,
            "best_step_s": best, "losses": losses, "loss_diff": diff,
            "same_losses": len(losses["pipeline"]) == len(losses["plain"]) and diff <= LOSS_TOLERANCE}


if __name__ == "__main__":
    main()
