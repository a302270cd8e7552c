# The router pipeline: scored prompts -> splits -> SFT (DeepSpeed ZeRO-3) -> consolidated
# model -> label-token scores -> calibrated threshold -> cost/quality evaluation.
# Logic in modelmake.router; only wiring here.
# Included only when the config has a router section.
# Its paths and input functions: rules/functions/router.smk (the Snakefile includes them first).

TARGETS += router_targets()


if ROUTER_BUILD:

    rule router_label_prompts:
        """The prompts the labels are built on: the first user turn of each conversation of the
        reformatted datasets, or users' prompt records; a seeded sample (router.build_labels.prompts)."""
        input:
            router_label_prompt_inputs(),
        output:
            router_labels_path("prompts.jsonl"),
        params:
            sources=router_label_prompt_args,
            fields=as_json(ROUTER_BUILD["prompts"]["fields"]),
            n=ROUTER_BUILD["prompts"]["n"] if ROUTER_BUILD["prompts"]["n"] is not None else "null",
            seed=config["seed"],
        log:
            log_path("router", ROUTER["run"], "labels", "prompts.log"),
        threads: job_threads("data")
        resources:
            **job_resources("data"),
        conda:
            "../envs/train.yaml"
        shell:
            "python -m modelmake router-label-prompts {params.sources:q} --fields {params.fields:q} "
            "--n {params.n:q} --seed {params.seed:q} --out {output:q} > {log:q} 2>&1"

    use rule generate from generation as router_label_answer with:
        input:
            prompts=router_labels_path("prompts.jsonl"),
            model=lambda w: model_inputs(router_label_role(w.label_model)),
        output:
            router_labels_path("answers", "{label_model}.jsonl"),
        wildcard_constraints:
            label_model="weak|strong",
        params:
            records=lambda w, input: input.prompts,
            settings=lambda w: generation_settings(
                "router.build_labels.answers", ROUTER_BUILD["answers"], model_source(router_label_role(w.label_model))
            ),
            pool=lambda w: generation_pool(router_label_role(w.label_model), servers=ROUTER_BUILD["servers"]),
        log:
            log_path("router", ROUTER["run"], "labels", "answer_{label_model}.log"),
        threads: job_threads("router.generate")
        resources:
            **job_resources(
                "router.generate", gpus=lambda w: pool_gpus(router_label_role(w.label_model), ROUTER_BUILD["servers"])
            ),

    rule router_judge_input:
        """A judge conversation per answer: the grading prompt (router.build_labels.grading.prompt)
        with the question, the answer and the scale filled in."""
        input:
            prompts=router_labels_path("prompts.jsonl"),
            weak=router_labels_path("answers", "weak.jsonl"),
            strong=router_labels_path("answers", "strong.jsonl"),
        output:
            router_labels_path("judge", "input.jsonl"),
        params:
            # functions: the templates' braces ({question}, ...) are no wildcards
            grading=lambda w: as_json({k: ROUTER_BUILD["grading"][k] for k in ("prompt", "system", "scale")}),
        log:
            log_path("router", ROUTER["run"], "labels", "judge_input.log"),
        threads: job_threads("data")
        resources:
            **job_resources("data"),
        conda:
            "../envs/train.yaml"
        shell:
            "python -m modelmake router-judge-input {input.prompts:q} --answers weak={input.weak:q} "
            "strong={input.strong:q} --grading {params.grading:q} --out {output:q} > {log:q} 2>&1"

    use rule generate from generation as router_judge with:
        input:
            records=router_labels_path("judge", "input.jsonl"),
            model=model_inputs(ROUTER_BUILD["judge"]),
        output:
            router_labels_path("judge", "replies.jsonl"),
        params:
            records=lambda w, input: input.records,
            settings=router_judge_settings(),
            pool=generation_pool(ROUTER_BUILD["judge"], servers=ROUTER_BUILD["servers"]),
        log:
            log_path("router", ROUTER["run"], "labels", "judge.log"),
        threads: job_threads("router.generate")
        resources:
            **job_resources("router.generate", gpus=pool_gpus(ROUTER_BUILD["judge"], ROUTER_BUILD["servers"])),

    rule router_judge_retry_input:
        """The judge conversations whose reply held no grade, with the retry prompt appended."""
        input:
            records=router_labels_path("judge", "input.jsonl"),
            replies=router_labels_path("judge", "replies.jsonl"),
        output:
            router_labels_path("judge", "retry_input.jsonl"),
        params:
            grading=lambda w: as_json({k: ROUTER_BUILD["grading"][k] for k in ("retry_prompt", "scale")}),
        log:
            log_path("router", ROUTER["run"], "labels", "judge_retry_input.log"),
        threads: job_threads("data")
        resources:
            **job_resources("data"),
        conda:
            "../envs/train.yaml"
        shell:
            "python -m modelmake router-judge-retry-input {input.records:q} --replies {input.replies:q} "
            "--grading {params.grading:q} --out {output:q} > {log:q} 2>&1"

    use rule generate from generation as router_judge_retry with:
        input:
            records=router_labels_path("judge", "retry_input.jsonl"),
            model=model_inputs(ROUTER_BUILD["judge"]),
        output:
            router_labels_path("judge", "retry_replies.jsonl"),
        params:
            records=lambda w, input: input.records,
            settings=router_judge_settings(retry=True),
            pool=generation_pool(ROUTER_BUILD["judge"], servers=ROUTER_BUILD["servers"]),
        log:
            log_path("router", ROUTER["run"], "labels", "judge_retry.log"),
        threads: job_threads("router.generate")
        resources:
            **job_resources("router.generate", gpus=pool_gpus(ROUTER_BUILD["judge"], ROUTER_BUILD["servers"])),

    rule router_labels:
        """Each answer's grade (the retry's where the first reply had none) -> the scored prompts
        {id, prompt, scores: {<weak>: g, <strong>: g}} on the judge's scale, and their stats; fails
        past router.build_labels.grading.max_failure_share answers without a grade."""
        input:
            prompts=router_labels_path("prompts.jsonl"),
            weak=router_labels_path("answers", "weak.jsonl"),
            strong=router_labels_path("answers", "strong.jsonl"),
            records=router_labels_path("judge", "input.jsonl"),
            replies=router_labels_path("judge", "replies.jsonl"),
            retries=router_labels_path("judge", "retry_replies.jsonl"),
        output:
            scored=router_labels_path("scored_prompts.jsonl"),
            stats=router_labels_path("stats.json"),
        params:
            names=as_json({m: router_label_role(m) for m in ("weak", "strong")}),
            grading=as_json({k: ROUTER_BUILD["grading"][k] for k in ("scale", "structured", "max_failure_share")}),
            config=lambda w: as_json(ROUTER_BUILD),
        log:
            log_path("router", ROUTER["run"], "labels", "labels.log"),
        threads: job_threads("data")
        resources:
            **job_resources("data"),
        conda:
            "../envs/train.yaml"
        shell:
            "python -m modelmake router-labels {input.prompts:q} --answers weak={input.weak:q} "
            "strong={input.strong:q} --judge-input {input.records:q} --replies {input.replies:q} "
            "--retries {input.retries:q} --names {params.names:q} --grading {params.grading:q} "
            "--config {params.config:q} --out {output.scored:q} --stats {output.stats:q} > {log:q} 2>&1"


rule router_data:
    """Validate the prompts (labels, scores per model on the declared scale; the built labels too,
    with router.build_labels), take the seeded subsample and cut train / calib / test (test from the
    records with both models' scores)."""
    input:
        data=local_sources(ROUTER["data"]),
        built=[router_labels_path("scored_prompts.jsonl")] if ROUTER_BUILD else [],
    output:
        train=router_path("data", "train.parquet"),
        calib=router_path("data", "calib.parquet"),
        test=router_path("data", "test.parquet"),
        stats=router_path("data", "stats.json"),
    params:
        sources=router_data_sources,
        fields=as_json(ROUTER["fields"]),
        scores=as_json(ROUTER["scores"]),
        system=["--system", ROUTER["system"]] if ROUTER["system"] is not None else [],
        n_sample=ROUTER["n_sample"] if ROUTER["n_sample"] is not None else "null",
        calib=ROUTER["split"]["calib"],
        test=ROUTER["split"]["test"],
        seed=config["seed"],
        config=as_json({k: ROUTER[k] for k in ("data", "fields", "scores", "system", "n_sample", "split")}),
    log:
        log_path("router", ROUTER["run"], "data.log"),
    threads: job_threads("data")
    resources:
        **job_resources("data"),
    conda:
        "../envs/train.yaml"
    shell:
        "python -m modelmake router-data {params.sources:q} --fields {params.fields:q} --scores {params.scores:q} "
        "{params.system:q} --train {output.train:q} "
        "--calib {output.calib:q} --test {output.test:q} --stats {output.stats:q} --n-sample {params.n_sample:q} "
        "--calib-share {params.calib:q} --test-share {params.test:q} --seed {params.seed:q} "
        "--config {params.config:q} > {log:q} 2>&1"

rule router_train:
    """TRL SFT of the base model on the train split (loss on [[k]] + EOS only), eval on calib;
    scaled by router.scale (torchrun, GPUs, precision, DeepSpeed ZeRO-3, LoRA). Resumes from router/<run>/ckpt."""
    input:
        train=router_path("data", "train.parquet"),
        calib=router_path("data", "calib.parquet"),
        base=model_inputs(ROUTER["base"]),
        deepspeed=[ROUTER["scale"]["deepspeed"]] if ROUTER["scale"]["deepspeed"] else [],
    output:
        directory(router_path("zero3" if ROUTER["scale"]["deepspeed"] else "model")),
    params:
        base=lambda w, input: input.base[0] if input.base else model_dir(ROUTER["base"]),
        ckpt=router_path("ckpt"),  # not declared: Trainer checkpoints survive a failed job
        settings=as_json(ROUTER["train"]),
        scale=as_json(ROUTER["scale"]),
        launcher=train_launcher(ROUTER["scale"]),
        seed=config["seed"],
        config=as_json({"train": ROUTER["train"], "scale": ROUTER["scale"], "base": model_source(ROUTER["base"])}),
    log:
        log_path("router", ROUTER["run"], "train.log"),
    benchmark:
        bench_path("router", ROUTER["run"], "train.tsv")
    threads: job_threads("router.train")
    resources:
        **train_resources("router.train", ROUTER["scale"]),
    conda:
        "../envs/train.yaml"
    shell:
        "OMP_NUM_THREADS={threads} PYTHONWARNINGS=ignore::FutureWarning {params.launcher} -m modelmake "
        "router-train --train {input.train:q} --eval {input.calib:q} --base {params.base:q} "
        "--out {output:q} --ckpt-dir {params.ckpt:q} --settings {params.settings:q} "
        "--scale {params.scale:q} --seed {params.seed:q} --config {params.config:q} > {log:q} 2>&1"

if ROUTER["scale"]["deepspeed"]:

    rule router_consolidate:
        """The ZeRO-3 checkpoint -> one safetensors model folder (DeepSpeed's zero_to_fp32),
        checked against the hashes of the trained weights recorded at the end of training."""
        input:
            router_path("zero3"),
        output:
            directory(router_path("model")),
        params:
            config=as_json({"train": ROUTER["train"], "scale": ROUTER["scale"]}),
        log:
            log_path("router", ROUTER["run"], "consolidate.log"),
        threads: job_threads("router.consolidate")
        resources:
            **job_resources("router.consolidate"),
        conda:
            "../envs/train.yaml"
        shell:
            "python -m modelmake router-consolidate {input:q} --out {output:q} "
            "--config {params.config:q} > {log:q} 2>&1"

rule router_score:
    """P([[1]]..[[5]]) from the label-token logits at the answer position, per prompt of a split."""
    input:
        model=router_path("model"),
        split=router_path("data", "{rsplit}.parquet"),
    output:
        router_path("scores", "{rsplit}.parquet"),
    wildcard_constraints:
        rsplit="calib|test|train",
    params:
        batch_size=ROUTER["score"]["batch_size"],
        config=as_json(ROUTER["score"]),
    log:
        log_path("router", ROUTER["run"], "score_{rsplit}.log"),
    threads: job_threads("router.score")
    resources:
        **job_resources("router.score", gpus=ROUTER["score"]["gpu"]),
    conda:
        "../envs/train.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python -m modelmake router-score --model {input.model:q} "
        "--split {input.split:q} --out {output:q} --batch-size {params.batch_size:q} "
        "--config {params.config:q} > {log:q} 2>&1"

rule router_calibrate:
    """Thresholds on P(weak ok) for the target strong-call shares, as quantiles of the calib set."""
    input:
        router_path("scores", "calib.parquet"),
    output:
        router_path("route", "calibration.json"),
    params:
        shares=ROUTER["route"]["strong_shares"],
    log:
        log_path("router", ROUTER["run"], "calibrate.log"),
    threads: job_threads("data")
    resources:
        **job_resources("data"),
    conda:
        "../envs/train.yaml"
    shell:
        "python -m modelmake router-calibrate {input:q} --strong-share {params.shares:q} "
        "--out {output:q} > {log:q} 2>&1"

rule router_evaluate:
    """Sweep thresholds on the test set: cost/quality curve vs a random router, APGR, CPT(50%/80%)."""
    input:
        scored=router_path("scores", "test.parquet"),
        calibration=router_path("route", "calibration.json"),
    output:
        metrics=report_item(router_path("eval", "metrics.json"), "router_metrics", "router", "Held-out evaluation"),
        plot=report_item(router_path("eval", "curve.png"), "router_curve", "router", "Held-out evaluation"),
    params:
        points=ROUTER["evaluate"]["points"],
        config=as_json({"evaluate": ROUTER["evaluate"], "route": ROUTER["route"]}),
    log:
        log_path("router", ROUTER["run"], "evaluate.log"),
    threads: job_threads("data")
    resources:
        **job_resources("data"),
    conda:
        "../envs/train.yaml"
    shell:
        "python -m modelmake router-evaluate {input.scored:q} --metrics {output.metrics:q} "
        "--plot {output.plot:q} --points {params.points:q} --calibration {input.calibration:q} "
        "--config {params.config:q} > {log:q} 2>&1"
