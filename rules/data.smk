# Data: raw chat jsonl -> reformatted parquet -> deterministic partitions and shards.


rule reformat:
    """Check and reformat one split of a raw chat dataset into {id, messages} parquet."""
    input:
        lambda w: config["datasets"][w.dataset]["splits"][w.split],
    output:
        parquet=data_path("{dataset}", "reformatted", "{split}.parquet"),
        rejects=data_path("{dataset}", "reformatted", "{split}.rejects.jsonl"),
        stats=data_path("{dataset}", "reformatted", "{split}.stats.json"),
    params:
        on_error=config["reformat"]["on_error"],
    log:
        log_path("reformat", "{dataset}", "{split}.log"),
    benchmark:
        bench_path("reformat", "{dataset}", "{split}.tsv")
    conda:
        "../envs/train.yaml"
    shell:
        "python -m modelmake reformat {input:q} --out {output.parquet:q} --rejects {output.rejects:q} "
        "--stats {output.stats:q} --on-error {params.on_error:q} > {log:q} 2>&1"


rule shard:
    """Write one partition of a reformatted split as shards, by a stable hash of the id."""
    input:
        data_path("{dataset}", "reformatted", "{split}.parquet"),
    output:
        directory(data_path("{dataset}", "shards", "{split}", "part{part}")),
    params:
        partitions=config["pseudo_labels"]["partitions"],
        shards=config["pseudo_labels"]["shards_per_partition"],
    log:
        log_path("shard", "{dataset}", "{split}", "part{part}.log"),
    conda:
        "../envs/train.yaml"
    shell:
        "python -m modelmake shard {input:q} --out {output:q} --part {wildcards.part} "
        "--partitions {params.partitions} --shards {params.shards} > {log:q} 2>&1"
