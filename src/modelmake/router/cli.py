"""The router pipeline's subcommands of ``python -m modelmake`` (argument wiring only).

torch / transformers / DeepSpeed are imported inside the commands, so ``python -m modelmake --help``
stays fast.
"""

from __future__ import annotations

import json
import logging
import sys


def cmd_data(a) -> None:
    from modelmake.router.data import write_splits

    out = {"train": a.train, "calib": a.calib, "test": a.test}
    stats = write_splits(a.inputs, out, a.stats, n_sample=a.n_sample, calib=a.calib_share, test=a.test_share,
                         seed=a.seed, config=json.loads(a.config), fields=json.loads(a.fields))
    logging.info("router data: %s", {k: v["records"] for k, v in stats.items()})


def cmd_train(a) -> None:
    from modelmake.router.train import train_router

    train_router(a.train, a.eval, a.base, a.out, a.ckpt_dir, settings=json.loads(a.settings),
                 scale=json.loads(a.scale), seed=a.seed, config=json.loads(a.config))


def cmd_consolidate(a) -> None:
    from modelmake.router.consolidate import consolidate

    consolidate(a.checkpoint, a.out, config=json.loads(a.config), tag=a.tag)


def cmd_score(a) -> None:
    from modelmake.router.score import score_file, score_prompts

    if a.split:
        score_file(a.model, a.split, a.out, batch_size=a.batch_size, config=json.loads(a.config))
        return
    prompts = _read_prompts(a.prompts)
    df = score_prompts(a.model, prompts, batch_size=a.batch_size)
    df.insert(0, "prompt", prompts)
    _write_rows(df.to_dict("records"), a.out)


def cmd_calibrate(a) -> None:
    import pandas as pd

    from modelmake.files import write_json
    from modelmake.router.route import calibration_record

    ref = pd.read_parquet(a.reference, columns=["p_weak_ok"])["p_weak_ok"].tolist()
    record = calibration_record(ref, a.strong_share, reference=a.reference)
    write_json(a.out, record)
    for r in record["thresholds"]:
        logging.info("strong share %.2f: threshold %.4f", r["strong_share"], r["threshold"])


def cmd_route(a) -> None:
    from modelmake.router.route import Router

    router = Router(a.model, a.calibration, strong_share=a.strong_share, threshold=a.threshold,
                    batch_size=a.batch_size)
    prompts = _read_prompts(a.prompts)
    scores = router.scores(prompts)
    rows = [{"prompt": p, "p_weak_ok": float(s), "route": "strong" if s < router.threshold else "weak"}
            for p, s in zip(prompts, scores["p_weak_ok"])]
    _write_rows(rows, a.out)


def cmd_evaluate(a) -> None:
    from modelmake.router.evaluate import evaluate_file

    evaluate_file(a.scored, a.metrics, a.plot, points=a.points, calibration=a.calibration,
                  config=json.loads(a.config))


def _read_prompts(path: str) -> list[str]:
    """Prompts from a jsonl file with a "prompt" field per line, or plain text lines; "-" is stdin."""
    from modelmake.errors import RecordError

    f = sys.stdin if path == "-" else open(path, encoding="utf-8")
    prompts = []
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                obj = json.loads(line)
                if not isinstance(obj.get("prompt"), str):
                    raise RecordError(f"bad record in {path}:{n}: no \"prompt\" string")
                prompts.append(obj["prompt"])
            else:
                prompts.append(line.rstrip("\n"))
    return prompts


def _write_rows(rows: list[dict], out: str | None) -> None:
    from modelmake.files import atomic_open, dumps

    if out is None:
        for r in rows:
            print(dumps(r))
        return
    with atomic_open(out) as f:
        for r in rows:
            f.write(dumps(r) + "\n")


def add_commands(sub) -> None:
    from modelmake.config import default

    p = sub.add_parser("router-data", help="scored prompts -> train / calib / test parquet")
    p.add_argument("inputs", nargs="+", help="files, datasets folders or hf:// ids (modelmake.records)")
    p.add_argument("--train", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--stats", required=True)
    p.add_argument("--n-sample", type=lambda s: None if s in ("", "null", "None") else int(s), default=None)
    p.add_argument("--calib-share", type=float, required=True)
    p.add_argument("--test-share", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default="{}")
    p.add_argument("--fields", default="{}", help="JSON {canonical name: name in the source} (router.fields)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("router-train", help="SFT a router (TRL; DeepSpeed ZeRO-3 when --scale names a config)")
    p.add_argument("--train", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--base", required=True, help="the base model folder")
    p.add_argument("--out", required=True, help="ZeRO-3 checkpoint folder (with deepspeed) or model folder")
    p.add_argument("--ckpt-dir", required=True, help="Trainer checkpoints, kept for resuming")
    p.add_argument("--settings", default="{}",
                   help="JSON of router.train settings (the schema's defaults fill the rest)")
    p.add_argument("--scale", default="{}", help="JSON of router.scale (modelmake.launch): precision, deepspeed, "
                   "gradient_checkpointing, lora, gpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default="{}")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("router-consolidate", help="ZeRO-3 checkpoint -> one HF safetensors model folder")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--tag", default=None, help="global_stepN (default: the 'latest' file)")
    p.add_argument("--config", default="{}")
    p.set_defaults(func=cmd_consolidate)

    p = sub.add_parser("router-score", help="P([[1]]..[[5]]), expected score and P(weak ok) per prompt")
    p.add_argument("--model", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--split", help="a router split parquet: writes a scored parquet to --out")
    src.add_argument("--prompts", help="jsonl with \"prompt\" or plain text lines ('-': stdin): jsonl rows out")
    p.add_argument("--out", default=None)
    p.add_argument("--batch-size", type=int, default=default("router.score.batch_size"))
    p.add_argument("--config", default="{}")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("router-calibrate", help="thresholds for target strong-call shares on a reference set")
    p.add_argument("reference", help="a scored parquet (router-score --split)")
    p.add_argument("--strong-share", type=float, nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("router-route", help="route prompts to the strong or the weak model")
    p.add_argument("--model", required=True)
    p.add_argument("--calibration", default=None)
    p.add_argument("--strong-share", type=float, default=None, help="which calibrated threshold to use")
    p.add_argument("--threshold", type=float, default=None, help="a threshold on p_weak_ok instead")
    p.add_argument("--prompts", required=True, help="jsonl with \"prompt\" or plain text lines ('-': stdin)")
    p.add_argument("--out", default=None, help="jsonl out (default: stdout)")
    p.add_argument("--batch-size", type=int, default=default("router.score.batch_size"))
    p.set_defaults(func=cmd_route)

    p = sub.add_parser("router-evaluate", help="threshold sweep, cost/quality curve, APGR, CPT")
    p.add_argument("scored", help="the scored test split")
    p.add_argument("--metrics", required=True)
    p.add_argument("--plot", required=True)
    p.add_argument("--points", type=int, default=default("router.evaluate.points"))
    p.add_argument("--calibration", default=None)
    p.add_argument("--config", default="{}")
    p.set_defaults(func=cmd_evaluate)
