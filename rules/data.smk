# Data: raw chat records (files, datasets folders, hub ids: modelmake.records) -> reformatted
# {id, messages} parquet (pseudo-labels shard it, self-play and distillation read it).


rule reformat:
    """Check and reformat one split of a raw chat dataset into {id, messages} parquet."""
    input:
        lambda w: local_sources(config["datasets"][w.dataset]["splits"][w.split]),
    output:
        parquet=data_path("{dataset}", "reformatted", "{split}.parquet"),
        rejects=data_path("{dataset}", "reformatted", "{split}.rejects.jsonl"),
        stats=data_path("{dataset}", "reformatted", "{split}.stats.json"),
    params:
        sources=record_sources(lambda w: config["datasets"][w.dataset]["splits"][w.split]),
        fields=lambda w: as_json(config["datasets"][w.dataset]["fields"]),
        on_error=config["reformat"]["on_error"],
    log:
        log_path("reformat", "{dataset}", "{split}.log"),
    benchmark:
        bench_path("reformat", "{dataset}", "{split}.tsv")
    threads: job_threads("data")
    resources:
        **job_resources("data"),
    conda:
        "../envs/train.yaml"
    shell:
        "python -m modelmake reformat {params.sources:q} --fields {params.fields:q} --out {output.parquet:q} "
        "--rejects {output.rejects:q} --stats {output.stats:q} --on-error {params.on_error:q} > {log:q} 2>&1"
