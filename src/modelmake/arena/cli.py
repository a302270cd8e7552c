"""``python -m modelmake arena-<verb>``: argument wiring for the arena rules (torch imported lazily)."""

from __future__ import annotations

import json
import logging

log = logging.getLogger(__name__)


def named(items: list[str], what: str) -> dict[str, str]:
    """``name=path`` arguments as a dict."""
    from modelmake.errors import UserError

    out = {}
    for it in items:
        name, sep, path = it.partition("=")
        if not sep:
            raise UserError(f"{what}: expected NAME=PATH, got {it!r}")
        out[name] = path
    return out


def cmd_prepare(a) -> None:
    from modelmake.arena.data import prepare
    from modelmake.config import default

    cfg = json.loads(a.config)
    folds = cfg.get("folds", default("arena.folds"))
    counts = prepare(a.inputs, a.out, labelled=a.labelled, folds=folds, config=cfg, fields=json.loads(a.fields))
    log.info("arena data: %s", counts)


def cmd_sample_prompts(a) -> None:
    from modelmake.arena.pairs import sample_prompts

    sample_prompts(a.pool, a.n, a.seed, a.out, fields=json.loads(a.fields))


def cmd_pairs(a) -> None:
    from modelmake.arena.pairs import make_pairs

    log.info("response pairs: %s", make_pairs(a.prompts, named(a.answers, "--answers"), a.seed, a.out))


def cmd_train(a) -> None:
    from modelmake.arena.stages import run_stage

    run_stage(init=a.init, labelled=a.labelled, pseudo=a.pseudo, out=a.out, ckpt=a.ckpt, eval_out=a.eval_out,
              loss_png=a.loss_plot, settings=json.loads(a.settings), seed=a.seed, name=a.name,
              scale=json.loads(a.scale))


def cmd_predict(a) -> None:
    from modelmake.arena.pseudo import predict_pairs

    log.info("predictions: %s", predict_pairs(a.model, a.pairs, a.out))


def cmd_merge_pseudo(a) -> None:
    from modelmake.arena.pseudo import merge

    s = json.loads(a.settings)
    log.info("pseudo-labels: %s", merge(a.pairs, named(a.predictions, "--predictions"), s["weights"],
                                         s["margin"], a.out, a.stats))


def cmd_export(a) -> None:
    from modelmake.arena.export import export_model

    log.info("export: %s", export_model(a.model, a.labelled, a.valid_fold, a.stage_eval, a.out, a.tolerance))


def cmd_export_ensemble(a) -> None:
    from modelmake.arena.export import export_ensemble

    s = json.loads(a.settings)
    log.info("ensemble: %s", export_ensemble(a.models, s["weights"], s["confident_margin"], a.labelled,
                                             a.valid_fold, a.stage_evals, a.out, a.tolerance))


def cmd_report(a) -> None:
    from modelmake.arena.report import report

    report(named(a.evals, "--evals"), a.ensemble, a.labelled, a.valid_fold, a.tsv, a.png, a.json)


def add_commands(sub) -> None:
    from modelmake.config import default

    p = sub.add_parser("arena-prepare", help="arena: pairwise records -> parquet (with folds when labelled)")
    p.add_argument("inputs", nargs="+", help="files, datasets folders or hf:// ids (modelmake.records)")
    p.add_argument("--out", required=True)
    p.add_argument("--labelled", action="store_true")
    p.add_argument("--config", default="{}", help="JSON: folds and the config slice to record")
    p.add_argument("--fields", default="{}", help="JSON {canonical name: name in the source} (arena.fields)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("arena-sample-prompts", help="arena: sample prompts for response pairs")
    p.add_argument("pool", help="a file, datasets folder or hf:// id (modelmake.records)")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--fields", default="{}",
                   help="JSON {canonical name: name in the source} (arena.response_pairs.fields)")
    p.set_defaults(func=cmd_sample_prompts)

    p = sub.add_parser("arena-pairs", help="arena: generators' answers -> A/B response pairs")
    p.add_argument("prompts")
    p.add_argument("--answers", nargs="+", required=True, help="GENERATOR=answers.jsonl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_pairs)

    p = sub.add_parser("arena-train", help="arena: train one stage of one base")
    p.add_argument("--init", required=True, help="the model folder to start from")
    p.add_argument("--labelled", required=True)
    p.add_argument("--pseudo", nargs="*", default=[], help="pseudo-labelled pairs (stage 2)")
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt", required=True, help="checkpoint folder (kept when the job fails)")
    p.add_argument("--eval-out", required=True)
    p.add_argument("--loss-plot", required=True)
    p.add_argument("--settings", required=True, help="JSON: template, train, valid_fold")
    p.add_argument("--scale", default="{}", help="JSON of arena.scale (modelmake.launch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="stage")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("arena-predict", help="arena: eval-only predictions (original and swapped)")
    p.add_argument("--model", required=True)
    p.add_argument("--pairs", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("arena-merge-pseudo", help="arena: weighted soft labels, margin filter")
    p.add_argument("--pairs", required=True)
    p.add_argument("--predictions", nargs="+", required=True, help="BASE=predictions.parquet")
    p.add_argument("--settings", required=True, help="JSON: weights, margin")
    p.add_argument("--out", required=True)
    p.add_argument("--stats", required=True)
    p.set_defaults(func=cmd_merge_pseudo)

    p = sub.add_parser("arena-export", help="arena: fp16 submission folder with predict.py")
    p.add_argument("--model", required=True)
    p.add_argument("--labelled", required=True)
    p.add_argument("--valid-fold", type=int, required=True)
    p.add_argument("--stage-eval", required=True)
    p.add_argument("--tolerance", type=float, default=default("arena.export.tolerance"))
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("arena-export-ensemble", help="arena: the two-model ensemble submission")
    p.add_argument("--models", nargs=2, required=True)
    p.add_argument("--stage-evals", nargs=2, required=True)
    p.add_argument("--labelled", required=True)
    p.add_argument("--valid-fold", type=int, required=True)
    p.add_argument("--settings", required=True, help="JSON: weights, confident_margin")
    p.add_argument("--tolerance", type=float, default=default("arena.export.tolerance"))
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export_ensemble)

    p = sub.add_parser("arena-report", help="arena: held-out table and plot")
    p.add_argument("--evals", nargs="+", required=True, help="STAGE/BASE=eval.parquet")
    p.add_argument("--ensemble", required=True, help="the ensemble's valid_predictions.parquet")
    p.add_argument("--labelled", required=True)
    p.add_argument("--valid-fold", type=int, required=True)
    p.add_argument("--tsv", required=True)
    p.add_argument("--png", required=True)
    p.add_argument("--json", required=True)
    p.set_defaults(func=cmd_report)
