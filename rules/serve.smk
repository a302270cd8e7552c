# Serving: a pool of vLLM servers behind a Traefik proxy, one pool per model and partition.
# The pool is a Snakemake service job grouped with its consumers; see docs/architecture.md.


rule serve_pool:
    """Run vLLM servers and their proxy until the consumers of this partition are done."""
    input:
        lambda w: model_inputs(w.model),
    output:
        service(directory(results("serve", "{model}", "part{part}"))),
    params:
        spec=pool_spec,
        log_dir=lambda w: log_path("serve", w.model, f"part{w.part}"),
        ready_timeout=config["serve"]["ready_timeout_s"],
    log:
        log_path("serve", "{model}", "part{part}", "supervisor.log"),
    group:
        "serve"
    threads: config["serve"]["servers_per_partition"] * config["serve"]["cpu_threads_per_server"]
    resources:
        gpu=config["serve"]["servers_per_partition"] if config["serve"]["gpu"] else 0,
        runtime=24 * 60,
    conda:
        "../envs/serve.yaml"
    shell:
        # exec: the supervisor itself receives Snakemake's SIGTERM and stops what it started.
        "exec python -m modelmake serve --folder {output:q} --log-dir {params.log_dir:q} --spec {params.spec:q} "
        "--ready-timeout {params.ready_timeout} > {log:q} 2>&1"
