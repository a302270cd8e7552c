# Distillation: data -> hybrid student init -> stage 1 (hidden states) -> stage 2 (KL + CE)
# -> held-out evaluation. Each stage job supervises its teacher processes and trainer ranks.
# Included only when the config has a distill section.

include: "functions/distill.smk"


TARGETS += distill_targets()


rule distill_chat_data:
    """Tokenize chat SFT data with the teacher's chat template; labels on assistant tokens only."""
    input:
        chat=distill_chat_inputs(),
        model=model_inputs(DI["teacher"]),
    output:
        train=distill_path("data", "chat", "train.parquet"),
        eval=distill_path("data", "chat", "eval.parquet"),
    params:
        tokenizer=lambda w: model_dir(DI["teacher"]),
        settings=as_json({"max_len": DI["max_len"], "eval_rows": DI["eval_rows"], "seed": config["seed"],
                          "max_rows": DI["chat"].get("max_rows")}),
    log:
        log_path("distill", DI["name"], "chat_data.log"),
    threads: job_threads("data")
    resources:
        **job_resources("data"),
    conda:
        "../envs/train.yaml"
    shell:
        "python -m modelmake distill-chat-data {input.chat:q} --tokenizer {params.tokenizer:q} "
        "--out-train {output.train:q} --out-eval {output.eval:q} --settings {params.settings:q} > {log:q} 2>&1"


rule distill_web_data:
    """Interleave the web text by language and pack it into max_len rows."""
    input:
        web=local_sources(distill_web_files()),
        model=model_inputs(DI["teacher"]),
    output:
        train=distill_path("data", "web", "train.parquet"),
        eval=distill_path("data", "web", "eval.parquet"),
    params:
        tokenizer=lambda w: model_dir(DI["teacher"]),
        files=as_json(DI["web"]["files"]),
        settings=as_json({"max_len": DI["max_len"], "eval_rows": DI["eval_rows"], "seed": config["seed"],
                          "pack": DI["web"]["pack"], "text_field": DI["web"]["text_field"]}),
    log:
        log_path("distill", DI["name"], "web_data.log"),
    threads: job_threads("data")
    resources:
        **job_resources("data"),
    conda:
        "../envs/train.yaml"
    shell:
        "python -m modelmake distill-web-data --files {params.files:q} --tokenizer {params.tokenizer:q} "
        "--out-train {output.train:q} --out-eval {output.eval:q} --settings {params.settings:q} > {log:q} 2>&1"


rule distill_init_student:
    """The hybrid student: the teacher with the configured layers' attention turned into time-mix."""
    input:
        model_inputs(DI["teacher"]),
    output:
        directory(distill_path("stage0", "model")),
    params:
        teacher=lambda w: model_dir(DI["teacher"]),
        settings=as_json({**DI["student"], "seed": config["seed"]}),
    log:
        log_path("distill", DI["name"], "init_student.log"),
    threads: job_threads("distill.init")
    resources:
        **job_resources("distill.init"),
    conda:
        "../envs/train.yaml"
    shell:
        "python -m modelmake distill-init --teacher {params.teacher:q} --out {output:q} "
        "--settings {params.settings:q} > {log:q} 2>&1"


rule distill_stage:
    """One distillation stage (1: hidden-state MSE, 2: KL + CE) from the previous stage's student,
    with a teacher process per group of trainer ranks; resumes from stage{n}/ckpt after a kill."""
    input:
        student=lambda w: distill_path(f"stage{int(w.n) - 1}", "model"),
        chat=distill_path("data", "chat", "train.parquet"),
        web=distill_path("data", "web", "train.parquet"),
        teacher=model_inputs(DI["teacher"]),
        deepspeed=[DI["scale"]["deepspeed"]] if DI["scale"]["deepspeed"] else [],
    output:
        model=directory(distill_path("stage{n}", "model")),
        plot=report(distill_path("stage{n}", "loss.png"), caption="../report/distill_loss.rst", category="distill"),
        history=distill_path("stage{n}", "history.json"),
    params:
        teacher=lambda w: model_dir(DI["teacher"]),
        ckpt=lambda w: distill_path(f"stage{w.n}", "ckpt"),
        ready=lambda w: distill_path("teacher", f"stage{w.n}"),
        logs=lambda w: log_path("distill", DI["name"], f"stage{w.n}"),
        settings=lambda w: distill_stage_settings(int(w.n)),
        layout=distill_layout(),
        scale=as_json(DI["scale"]),
    wildcard_constraints:
        n="[12]",
    log:
        log_path("distill", DI["name"], "stage{n}.log"),
    benchmark:
        bench_path("distill", DI["name"], "stage{n}.tsv")
    threads: job_threads("distill.stage")
    resources:
        **train_resources("distill.stage", DI["scale"], distill_processes()),
    conda:
        "../envs/train.yaml"
    shell:
        "python -m modelmake distill-stage --teacher {params.teacher:q} --student {input.student:q} "
        "--data {input.chat:q} {input.web:q} --out {output.model:q} --plot {output.plot:q} "
        "--history {output.history:q} --ckpt {params.ckpt:q} --ready-dir {params.ready:q} "
        "--log-dir {params.logs:q} --settings {params.settings:q} --layout {params.layout:q} "
        "--scale {params.scale:q} > {log:q} 2>&1"


rule distill_eval:
    """Held-out perplexity of teacher and student (before and after each stage) and KL to the teacher."""
    input:
        stage0=distill_path("stage0", "model"),
        stage1=distill_path("stage1", "model"),
        stage2=distill_path("stage2", "model"),
        chat=distill_path("data", "chat", "eval.parquet"),
        web=distill_path("data", "web", "eval.parquet"),
        teacher=model_inputs(DI["teacher"]),
    output:
        metrics=report(distill_path("eval", "metrics.json"), caption="../report/distill_metrics.rst",
                       category="distill"),
        plot=report(distill_path("eval", "perplexity.png"), caption="../report/distill_metrics.rst",
                    category="distill"),
    params:
        teacher=lambda w: model_dir(DI["teacher"]),
        settings=as_json(DI["eval"]),
    log:
        log_path("distill", DI["name"], "eval.log"),
    benchmark:
        bench_path("distill", DI["name"], "eval.tsv")
    threads: job_threads("distill.eval")
    resources:
        **job_resources("distill.eval"),
    conda:
        "../envs/train.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python -m modelmake distill-eval --teacher {params.teacher:q} "
        "--student stage0={input.stage0:q} --student stage1={input.stage1:q} --student stage2={input.stage2:q} "
        "--eval chat={input.chat:q} --eval web={input.web:q} --out {output.metrics:q} --plot {output.plot:q} "
        "--settings {params.settings:q} > {log:q} 2>&1"
