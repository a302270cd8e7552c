# Self-play: single-turn prompts -> per-iteration generation in fractions (the shared generation
# rule: leased vLLM pool, resumable client) -> KTO pairs -> KTO with an nnPU prior -> held-out metrics.
# Iteration t generates with, starts from and is regularised towards iteration t-1's model.
# Included only when the config has a selfplay section (iterations: 0 builds nothing).
# Its paths and input functions: rules/functions/selfplay.smk (the Snakefile includes them first).

TARGETS += sp_targets()


wildcard_constraints:
    it=r"\d+",
    sppart=r"train|test",
    frac=r"\d+",


rule selfplay_prompts:
    """Single-turn {id, prompt, real} parquet: each conversation's first user turn and gold answer."""
    input:
        lambda w: data_path(SP["dataset"], "reformatted", f"{sp_split(w.sppart)}.parquet"),
    output:
        sp_path("data", "{sppart}.parquet"),
    params:
        config=lambda w: as_json({"dataset": SP["dataset"], "split": sp_split(w.sppart)}),
    log:
        log_path("selfplay", "prompts_{sppart}.log"),
    threads: job_threads("data")
    resources:
        **job_resources("data"),
    conda:
        "../envs/train.yaml"
    shell:
        "python -m modelmake selfplay-prompts {input:q} --out {output:q} --config {params.config:q} > {log:q} 2>&1"


checkpoint selfplay_fractions:
    """Split the prompts into fractions of frac_len (each fraction one generation target)."""
    input:
        sp_path("data", "{sppart}.parquet"),
    output:
        directory(sp_path("data", "{sppart}_fractions")),
    params:
        frac_len=SP["frac_len"],
    log:
        log_path("selfplay", "fractions_{sppart}.log"),
    threads: job_threads("data")
    resources:
        **job_resources("data"),
    conda:
        "../envs/train.yaml"
    shell:
        "python -m modelmake selfplay-fractions {input:q} --out {output:q} --frac-len {params.frac_len} > {log:q} 2>&1"


use rule generate from generation as selfplay_generate with:
    input:
        fractions=sp_path("data", "{sppart}_fractions"),
        model=lambda w: sp_start_inputs(int(w.it)),
    output:
        sp_path("iter{it}", "generated", "{sppart}", "frac{frac}.jsonl"),
    params:
        records=sp_path("data", "{sppart}_fractions", "frac{frac}.jsonl"),
        settings=sp_generation_settings,
        # every iteration's model is served with the SFT model's settings (models.<sft_model>.serve)
        pool=lambda w: generation_pool(
            SP["sft_model"], model=sp_start_model(int(w.it)), servers=SP["world_size"],
            name=sp_pool(int(w.it)) if int(w.it) else None, label=sp_pool(int(w.it)),
        ),
    log:
        log_path("selfplay", "iter{it}", "generate_{sppart}_frac{frac}.log"),
    threads: job_threads("selfplay.generate")
    resources:
        **job_resources("selfplay.generate", gpus=pool_gpus(SP["sft_model"], SP["world_size"])),


rule selfplay_convert:
    """KTO pairs of one split: real answers (labelled good) beside generated ones (unlabelled), by id."""
    input:
        prompts=sp_path("data", "{sppart}.parquet"),
        fractions=sp_generated,
    output:
        sp_path("iter{it}", "{sppart}.parquet"),
    params:
        seed=config["seed"],
        config=lambda w: as_json({"iteration": int(w.it), "generator": sp_start_source(int(w.it))}),
    log:
        log_path("selfplay", "iter{it}", "convert_{sppart}.log"),
    threads: job_threads("data")
    resources:
        **job_resources("data"),
    conda:
        "../envs/train.yaml"
    shell:
        "python -m modelmake selfplay-convert {input.fractions:q} --prompts {input.prompts:q} --out {output:q} "
        "--seed {params.seed} --config {params.config:q} > {log:q} 2>&1"


rule selfplay_train:
    """KTO with the nnPU prior from iteration it's starting model (also the reference)."""
    input:
        data=sp_path("iter{it}", "train.parquet"),
        start=lambda w: sp_start_inputs(int(w.it)),
        deepspeed=[SP["scale"]["deepspeed"]] if SP["scale"]["deepspeed"] else [],
    output:
        model=directory(sp_path("iter{it}", "model")),
        loss=report_item(sp_path("iter{it}", "loss.png"), "selfplay_loss", "selfplay", "Training iteration {it}"),
    params:
        start=lambda w: sp_start_model(int(w.it)),
        settings=lambda w: as_json(sp_settings(int(w.it))["train"]),
        config=lambda w: as_json({"selfplay": sp_recipe(int(w.it))}),
        ckpt=lambda w: sp_path(f"iter{w.it}", "ckpt"),
        scale=as_json(SP["scale"]),
        launcher=train_launcher(SP["scale"]),
        seed=config["seed"],
    log:
        log_path("selfplay", "iter{it}", "train.log"),
    benchmark:
        bench_path("selfplay", "iter{it}", "train.tsv")
    threads: job_threads("selfplay.train")
    resources:
        **train_resources("selfplay.train", SP["scale"]),
    conda:
        "../envs/train.yaml"
    shell:
        "OMP_NUM_THREADS={threads} {params.launcher} -m modelmake selfplay-train {input.data:q} "
        "--start {params.start:q} --out {output.model:q} --ckpt {params.ckpt:q} --settings {params.settings:q} "
        "--scale {params.scale:q} --seed {params.seed} "
        "--loss-plot {output.loss:q} --config {params.config:q} > {log:q} 2>&1"


rule selfplay_eval:
    """Held-out reward margin, win-rate proxy and log-likelihood gap of iteration it.

    One thread (the demo's resources.selfplay.eval) and a priority: it runs beside the next
    iteration's first generation job, while that job waits for its vLLM pool to start, instead of
    after the next iteration's generation.
    """
    input:
        test=sp_path("iter{it}", "test.parquet"),
        model=sp_path("iter{it}", "model"),
        start=lambda w: sp_start_inputs(int(w.it)),
    output:
        sp_path("iter{it}", "eval.json"),
    params:
        start=lambda w: sp_start_model(int(w.it)),
        beta=lambda w: sp_settings(int(w.it))["train"]["beta"],
        max_length=lambda w: sp_settings(int(w.it))["train"]["max_length"],
    log:
        log_path("selfplay", "iter{it}", "eval.log"),
    priority: 1
    threads: job_threads("selfplay.eval")
    resources:
        **job_resources("selfplay.eval"),
    conda:
        "../envs/train.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python -m modelmake selfplay-eval {input.test:q} --model {input.model:q} "
        "--start {params.start:q} --out {output:q} --beta {params.beta} --max-length {params.max_length} "
        "--iteration {wildcards.it} > {log:q} 2>&1"


rule selfplay_plot:
    """The per-iteration metrics in one table and one plot, for the report."""
    input:
        [sp_path(f"iter{t}", "eval.json") for t in range(SP["iterations"])],
    output:
        plot=report_item(sp_path("metrics.png"), "selfplay_plot", "selfplay", "Held-out evaluation"),
        table=report_item(sp_path("metrics.json"), "selfplay_metrics", "selfplay", "Held-out evaluation"),
    log:
        log_path("selfplay", "plot.log"),
    threads: job_threads("data")
    resources:
        **job_resources("data"),
    conda:
        "../envs/train.yaml"
    shell:
        "python -m modelmake selfplay-plot {input:q} --plot {output.plot:q} --table {output.table:q} > {log:q} 2>&1"
