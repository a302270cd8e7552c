# Arena: a pairwise preference classifier in three stages, ensemble soft pseudo-labels,
# response pairs generated through the serving pools, fp16 submission export, held-out report.
# Included only when the config has an arena section.
# Its paths and input functions: rules/functions/arena.smk (the Snakefile includes them first).

TARGETS += arena_targets()


wildcard_constraints:
    arena_stage=r"stage[123]",
    base=r"[A-Za-z0-9_.-]+",
    generator=r"[A-Za-z0-9_.-]+",
    source=r"unlabelled|generated",


rule arena_prepare:
    """Check the pairwise records and write them as parquet (turn lists); labelled pairs get a fold by
    id hash, ties are dropped or kept as 0.5/0.5 (arena.ties), bad records fail or go to the rejects
    (arena.on_error); the stats count them."""
    input:
        labelled=local_sources(AR["labelled"]),
        unlabelled=local_sources(AR["unlabelled"]),
    output:
        labelled=arena_path("data", "labelled.parquet"),
        unlabelled=arena_path("data", "unlabelled.parquet"),
        labelled_rejects=arena_path("data", "labelled.rejects.jsonl"),
        unlabelled_rejects=arena_path("data", "unlabelled.rejects.jsonl"),
        labelled_stats=arena_path("data", "labelled.stats.json"),
        unlabelled_stats=arena_path("data", "unlabelled.stats.json"),
    params:
        labelled=record_sources(AR["labelled"], "labelled"),
        unlabelled=record_sources(AR["unlabelled"], "unlabelled"),
        fields=as_json(AR["fields"]),
        ties=AR["ties"],
        on_error=AR["on_error"],
        config=as_json({"folds": AR["folds"], "fields": AR["fields"]}),
    log:
        log_path("arena", "prepare.log"),
    threads: job_threads("data")
    resources:
        **job_resources("data"),
    conda:
        "../envs/train.yaml"
    shell:
        "(python -m modelmake arena-prepare {params.labelled:q} --labelled --out {output.labelled:q} "
        "--rejects {output.labelled_rejects:q} --stats {output.labelled_stats:q} --ties {params.ties:q} "
        "--on-error {params.on_error:q} --config {params.config:q} --fields {params.fields:q} "
        "&& python -m modelmake arena-prepare {params.unlabelled:q} --out {output.unlabelled:q} "
        "--rejects {output.unlabelled_rejects:q} --stats {output.unlabelled_stats:q} "
        "--on-error {params.on_error:q} --config {params.config:q} --fields {params.fields:q}"
        ") > {log:q} 2>&1"


rule arena_sample_prompts:
    """Sample the prompts the generators answer, as {id, messages: [user, assistant placeholder]}."""
    input:
        local_sources([AR["response_pairs"]["prompt_pool"]]),
    output:
        arena_path("pairs", "prompts.jsonl"),
    params:
        pool=record_sources([AR["response_pairs"]["prompt_pool"]]),
        fields=as_json(AR["response_pairs"]["fields"]),
        n=AR["response_pairs"]["prompts"],
        seed=config["seed"],
    log:
        log_path("arena", "sample_prompts.log"),
    threads: job_threads("data")
    resources:
        **job_resources("data"),
    conda:
        "../envs/train.yaml"
    shell:
        "python -m modelmake arena-sample-prompts {params.pool:q} --fields {params.fields:q} --n {params.n} "
        "--seed {params.seed} --out {output:q} > {log:q} 2>&1"


use rule generate from generation as arena_generate with:
    input:
        prompts=arena_path("pairs", "prompts.jsonl"),
        model=lambda w: model_inputs(w.generator),
    output:
        arena_path("pairs", "answers", "{generator}.jsonl"),
    params:
        records=lambda w, input: input.prompts,
        settings=lambda w: generation_settings("arena.response_pairs", AR["response_pairs"], model_source(w.generator)),
        pool=lambda w: generation_pool(w.generator, servers=AR["response_pairs"]["servers"]),
    log:
        log_path("arena", "generate", "{generator}.log"),
    threads: job_threads("arena.generate")
    resources:
        **job_resources("arena.generate", gpus=lambda w: pool_gpus(w.generator, AR["response_pairs"]["servers"])),


rule arena_pairs:
    """Pair the generators' answers per prompt, A/B order by a seeded hash."""
    input:
        prompts=arena_path("pairs", "prompts.jsonl"),
        answers=expand(arena_path("pairs", "answers", "{generator}.jsonl"),
                       generator=AR["response_pairs"]["generators"]),
    output:
        arena_path("pairs", "pairs.parquet"),
    params:
        answers=[f"{g}={arena_path('pairs', 'answers', f'{g}.jsonl')}" for g in AR["response_pairs"]["generators"]],
        seed=config["seed"],
    log:
        log_path("arena", "pairs.log"),
    threads: job_threads("data")
    resources:
        **job_resources("data"),
    conda:
        "../envs/train.yaml"
    shell:
        "python -m modelmake arena-pairs {input.prompts:q} --answers {params.answers:q} --seed {params.seed} "
        "--out {output:q} > {log:q} 2>&1"


rule arena_train:
    """Train one stage of one base; predict the held-out fold (as given and swapped).

    Checkpoints go to arena/<run>/ckpt/<stage>/<base>/, which is not an output: a killed or failed
    job keeps them and the rerun resumes from the last complete one (unless settings or inputs changed).
    """
    input:
        unpack(lambda w: arena_stage_inputs(w.arena_stage, w.base)),
        deepspeed=[AR["scale"]["deepspeed"]] if AR["scale"]["deepspeed"] else [],
    output:
        model=directory(arena_model("{arena_stage}", "{base}")),
        eval=arena_path("eval", "{arena_stage}", "{base}.parquet"),
        metrics=arena_path("eval", "{arena_stage}", "{base}.json"),
        loss=report_item(arena_path("eval", "{arena_stage}", "{base}.loss.png"), "arena_loss", "arena",
                         "Training {arena_stage}"),
    params:
        settings=lambda w: arena_stage_settings(w.arena_stage),
        ckpt=lambda w: arena_path("ckpt", w.arena_stage, w.base),
        scale=as_json(AR["scale"]),
        launcher=train_launcher(AR["scale"]),
        seed=config["seed"],
    log:
        log_path("arena", "train", "{arena_stage}", "{base}.log"),
    benchmark:
        bench_path("arena", "train", "{arena_stage}", "{base}.tsv")
    threads: job_threads("arena.train")
    resources:
        **train_resources("arena.train", AR["scale"]),
    conda:
        "../envs/train.yaml"
    shell:
        "OMP_NUM_THREADS={threads} {params.launcher} -m modelmake arena-train --init {input.init:q} "
        "--labelled {input.labelled:q} --pseudo {input.pseudo:q} --out {output.model:q} --ckpt {params.ckpt:q} "
        "--eval-out {output.eval:q} --loss-plot {output.loss:q} --settings {params.settings:q} "
        "--scale {params.scale:q} --seed {params.seed} --name {wildcards.arena_stage}/{wildcards.base} > {log:q} 2>&1"


rule arena_predict:
    """Eval-only predictions of one stage-1 model on a pseudo-label source (original and swapped)."""
    input:
        model=arena_model("stage1", "{base}"),
        pairs=lambda w: arena_source_pairs(w.source),
    output:
        arena_path("pseudo", "{source}", "{base}.parquet"),
    log:
        log_path("arena", "predict", "{source}", "{base}.log"),
    threads: job_threads("arena.predict")
    resources:
        **job_resources("arena.predict", gpus=1 if AR["scale"]["gpu"] else 0),
    conda:
        "../envs/train.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python -m modelmake arena-predict --model {input.model:q} "
        "--pairs {input.pairs:q} --out {output:q} > {log:q} 2>&1"


rule arena_merge_pseudo:
    """Merge the stage-1 models' predictions by configured weights into soft labels; drop unsure pairs."""
    input:
        pairs=lambda w: arena_source_pairs(w.source),
        predictions=expand(arena_path("pseudo", "{{source}}", "{base}.parquet"), base=AR["bases"]),
    output:
        parquet=arena_path("pseudo", "{source}.parquet"),
        stats=arena_path("pseudo", "{source}.stats.json"),
    params:
        predictions=lambda w: [f"{b}={arena_path('pseudo', w.source, f'{b}.parquet')}" for b in AR["bases"]],
        settings=as_json(AR["pseudo"]),
    log:
        log_path("arena", "merge_pseudo", "{source}.log"),
    threads: job_threads("data")
    resources:
        **job_resources("data"),
    conda:
        "../envs/train.yaml"
    shell:
        "python -m modelmake arena-merge-pseudo --pairs {input.pairs:q} --predictions {params.predictions:q} "
        "--settings {params.settings:q} --out {output.parquet:q} --stats {output.stats:q} > {log:q} 2>&1"


rule arena_export:
    """fp16 submission folder of a base's stage-3 model; its predict.py must reproduce the held-out predictions."""
    input:
        model=arena_model("stage3", "{base}"),
        labelled=arena_path("data", "labelled.parquet"),
        eval=arena_path("eval", "stage3", "{base}.parquet"),
    output:
        directory(arena_path("submission", "{base}")),
    params:
        valid_fold=AR["valid_fold"],
        tolerance=AR["export"]["tolerance"],
        predict_timeout=AR["export"]["predict_timeout_s"],
    log:
        log_path("arena", "export", "{base}.log"),
    threads: job_threads("arena.export")
    resources:
        **job_resources("arena.export"),
    conda:
        "../envs/train.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python -m modelmake arena-export --model {input.model:q} "
        "--labelled {input.labelled:q} --valid-fold {params.valid_fold} --stage-eval {input.eval:q} "
        "--tolerance {params.tolerance} --predict-timeout {params.predict_timeout} --out {output:q} > {log:q} 2>&1"


rule arena_export_ensemble:
    """The ensemble submission (first base on the input, second on the swapped input), checked on the held-out fold."""
    input:
        models=expand(arena_path("submission", "{base}"), base=AR["bases"][:2]),
        evals=expand(arena_path("eval", "stage3", "{base}.parquet"), base=AR["bases"][:2]),
        labelled=arena_path("data", "labelled.parquet"),
    output:
        directory(arena_path("submission", "ensemble")),
    params:
        settings=as_json(AR["ensemble"]),
        valid_fold=AR["valid_fold"],
        tolerance=AR["export"]["tolerance"],
        predict_timeout=AR["export"]["predict_timeout_s"],
    log:
        log_path("arena", "export", "ensemble.log"),
    threads: job_threads("arena.export")
    resources:
        **job_resources("arena.export"),
    conda:
        "../envs/train.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python -m modelmake arena-export-ensemble --models {input.models:q} "
        "--stage-evals {input.evals:q} --labelled {input.labelled:q} --valid-fold {params.valid_fold} "
        "--settings {params.settings:q} --tolerance {params.tolerance} --predict-timeout {params.predict_timeout} "
        "--out {output:q} > {log:q} 2>&1"


rule arena_report:
    """Held-out log-loss and accuracy of every stage of every base and of the ensemble: table and plot."""
    input:
        evals=expand(arena_path("eval", "{arena_stage}", "{base}.parquet"), arena_stage=STAGES, base=AR["bases"]),
        ensemble=arena_path("submission", "ensemble"),
        labelled=arena_path("data", "labelled.parquet"),
    output:
        tsv=report_item(arena_path("eval", "metrics.tsv"), "arena_metrics", "arena", "Held-out evaluation"),
        png=report_item(arena_path("eval", "metrics.png"), "arena_plot", "arena", "Held-out evaluation"),
        json=arena_path("eval", "metrics.json"),
    params:
        evals=[f"{s}/{b}={arena_path('eval', s, f'{b}.parquet')}" for s in STAGES for b in AR["bases"]],
        valid_fold=AR["valid_fold"],
    log:
        log_path("arena", "report.log"),
    threads: job_threads("data")
    resources:
        **job_resources("data"),
    conda:
        "../envs/train.yaml"
    shell:
        "python -m modelmake arena-report --evals {params.evals:q} "
        "--ensemble {input.ensemble:q}/valid_predictions.parquet --labelled {input.labelled:q} "
        "--valid-fold {params.valid_fold} --tsv {output.tsv:q} --png {output.png:q} --json {output.json:q} "
        "> {log:q} 2>&1"
