"""``python -m modelmake distill-*``: the entry points of rules/distill.smk (argument wiring only)."""

from __future__ import annotations

import json


def cmd_chat_data(a) -> None:
    from modelmake.config import default
    from modelmake.distill.data import build_chat

    s = json.loads(a.settings)
    build_chat(a.parquets, a.tokenizer, a.out_train, a.out_eval, max_len=s["max_len"], eval_rows=s["eval_rows"],
               seed=s["seed"], max_rows=s.get("max_rows", default("distill.chat.max_rows")))


def cmd_web_data(a) -> None:
    from modelmake.distill.data import build_web

    s = json.loads(a.settings)
    build_web(json.loads(a.files), a.tokenizer, a.out_train, a.out_eval, max_len=s["max_len"],
              eval_rows=s["eval_rows"], seed=s["seed"], pack=s["pack"], text_field=s.get("text_field"))


def cmd_init(a) -> None:
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modelmake.config import fill_defaults
    from modelmake.distill.hybrid import from_teacher
    from modelmake.errors import ConfigError
    from modelmake.training import save_model_folder, seed_everything

    s = fill_defaults("distill.student", json.loads(a.settings))  # rwkv_layers, use_fla; and the seed
    started = time.time()
    seed_everything(s["seed"])
    teacher = AutoModelForCausalLM.from_pretrained(a.teacher)
    try:
        student = from_teacher(teacher, s["rwkv_layers"], use_fla=s["use_fla"])
    except ValueError as e:
        raise ConfigError(f"distill.student.rwkv_layers: {e}") from None
    save_model_folder(a.out, student, AutoTokenizer.from_pretrained(a.teacher), config=s, inputs=[a.teacher],
                      counts={"rwkv_layers": len(s["rwkv_layers"]),
                              "parameters": sum(p.numel() for p in student.parameters())},
                      started=started)


def cmd_stage(a) -> None:
    from modelmake.config import fill_defaults
    from modelmake.distill.launch import run_stage

    lay = fill_defaults("distill.service", json.loads(a.layout))
    job = {"settings": json.loads(a.settings), "teacher": a.teacher, "student": a.student, "data": a.data,
           "out": a.out, "plot": a.plot, "history": a.history, "ckpt": a.ckpt, "ready_dir": a.ready_dir,
           "groups": lay["groups"], "ranks_per_group": lay["ranks_per_group"], "teacher_mode": lay["mode"],
           "threads_per_process": lay["threads_per_process"]}
    run_stage(job, a.log_dir, lay["ready_timeout_s"], scale=json.loads(a.scale))


def cmd_eval(a) -> None:
    from modelmake.config import fill_defaults
    from modelmake.distill.evaluate import evaluate, plot_metrics

    s = fill_defaults("distill.eval", json.loads(a.settings))
    students = dict(x.split("=", 1) for x in a.student)
    evals = dict(x.split("=", 1) for x in a.eval)
    metrics = evaluate(a.teacher, students, evals, a.out, batch_size=s["batch_size"],
                       temperature=s["temperature"], config=s)
    plot_metrics(metrics, a.plot)


def add_commands(sub) -> None:
    p = sub.add_parser("distill-chat-data", help="chat SFT rows (assistant-only labels) -> train/eval parquet")
    p.add_argument("parquets", nargs="+", help="reformatted {id, messages} parquet files")
    p.add_argument("--tokenizer", required=True, help="a folder with the teacher's tokenizer")
    p.add_argument("--out-train", required=True)
    p.add_argument("--out-eval", required=True)
    p.add_argument("--settings", required=True, help="JSON: max_len, eval_rows, seed, max_rows")
    p.set_defaults(func=cmd_chat_data)

    p = sub.add_parser("distill-web-data", help="C4-style web text, interleaved by language, packed -> parquet")
    p.add_argument("--files", required=True, help="JSON {language: [sources (modelmake.records)]}")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out-train", required=True)
    p.add_argument("--out-eval", required=True)
    p.add_argument("--settings", required=True, help="JSON: max_len, eval_rows, seed, pack, text_field")
    p.set_defaults(func=cmd_web_data)

    p = sub.add_parser("distill-init", help="hybrid student initialised from the teacher")
    p.add_argument("--teacher", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--settings", required=True, help="JSON: rwkv_layers, use_fla, seed")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("distill-stage", help="run one distillation stage: teachers and trainer ranks, supervised")
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True, help="the stage's starting student folder")
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--plot", required=True)
    p.add_argument("--history", required=True)
    p.add_argument("--ckpt", required=True, help="checkpoint folder that survives a failed job")
    p.add_argument("--ready-dir", required=True, help="where teachers write group{g}.ready")
    p.add_argument("--log-dir", required=True, help="one log per process")
    p.add_argument("--settings", required=True, help="JSON of the stage's training settings")
    p.add_argument("--layout", required=True,
                   help="JSON: groups, ranks_per_group, mode, threads_per_process, ready_timeout_s")
    p.add_argument("--scale", default="{}",
                   help="JSON of distill.scale (modelmake.launch): gpu, precision, deepspeed, gradient_checkpointing")
    p.set_defaults(func=cmd_stage)

    p = sub.add_parser("distill-eval", help="held-out perplexity and KL to the teacher -> metrics JSON and plot")
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", action="append", required=True, help="NAME=FOLDER, repeatable")
    p.add_argument("--eval", action="append", required=True, help="NAME=PARQUET, repeatable")
    p.add_argument("--out", required=True)
    p.add_argument("--plot", required=True)
    p.add_argument("--settings", required=True, help="JSON: batch_size, temperature")
    p.set_defaults(func=cmd_eval)
