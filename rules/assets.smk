# Demo assets: a BPE tokenizer and tiny Llama models built from the sample corpora.
# Only used when config.models name an asset; real model folders come from config paths.


rule build_tokenizer:
    """Train the demo's byte-level BPE tokenizer (with a chat template) on the sample corpora."""
    input:
        asset_corpora(),
    output:
        directory(asset_tokenizer()),
    params:
        vocab_size=lambda w: config["assets"]["tokenizer"]["vocab_size"],
    log:
        log_path("assets", "tokenizer.log"),
    threads: job_threads("assets")
    resources:
        **job_resources("assets"),
    conda:
        "../envs/train.yaml"
    shell:
        "python -m modelmake build-tokenizer {input:q} --out {output:q} --vocab-size {params.vocab_size} > {log:q} 2>&1"


rule build_model:
    """Build a tiny Llama-family model and fit it briefly on the corpora (seeded, deterministic)."""
    input:
        tokenizer=asset_tokenizer(),
        corpora=asset_corpora(),
    output:
        directory(asset_model("{name}")),
    params:
        arch=lambda w: as_json(config["assets"]["models"][w.name]),
        seed=config["seed"],
    log:
        log_path("assets", "model_{name}.log"),
    benchmark:
        bench_path("assets", "model_{name}.tsv")
    threads: job_threads("assets")
    resources:
        **job_resources("assets"),
    conda:
        "../envs/train.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python -m modelmake build-model {input.corpora:q} --tokenizer {input.tokenizer:q} "
        "--out {output:q} --arch {params.arch:q} --seed {params.seed} > {log:q} 2>&1"
