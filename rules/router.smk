# The router pipeline: scored prompts -> splits -> SFT (DeepSpeed ZeRO-3) -> consolidated
# model -> label-token scores -> calibrated threshold -> cost/quality evaluation.
# Logic in modelmake.router; only wiring here.
# Included only when the config has a router section.

include: "functions/router.smk"


TARGETS += router_targets()


rule router_data:
    """Validate the scored prompts, take the seeded subsample and cut train / calib / test."""
    input:
        local_sources(ROUTER["data"]),
    output:
        train=router_path("data", "train.parquet"),
        calib=router_path("data", "calib.parquet"),
        test=router_path("data", "test.parquet"),
        stats=router_path("data", "stats.json"),
    params:
        sources=record_sources(ROUTER["data"]),
        fields=as_json(ROUTER["fields"]),
        n_sample=ROUTER["n_sample"] if ROUTER["n_sample"] is not None else "null",
        calib=ROUTER["split"]["calib"],
        test=ROUTER["split"]["test"],
        seed=config["seed"],
        config=as_json({k: ROUTER[k] for k in ("data", "fields", "n_sample", "split")}),
    log:
        log_path("router", ROUTER["run"], "data.log"),
    threads: job_threads("data")
    resources:
        **job_resources("data"),
    conda:
        "../envs/train.yaml"
    shell:
        "python -m modelmake router-data {params.sources:q} --fields {params.fields:q} --train {output.train:q} "
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
        metrics=report(router_path("eval", "metrics.json"), caption="../report/router_metrics.rst",
                       category="Router"),
        plot=report(router_path("eval", "curve.png"), caption="../report/router_curve.rst",
                    category="Router"),
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
