# The one generation rule: answer the conversations of a jsonl file through a leased serving pool.
# Not used as it stands: each pipeline takes it under its own name (`use rule generate from
# generation as ...`; rules/common.smk declares the module) with its own input, output, log, params.


rule generate:
    """Answer every conversation of params.records through the pool of params.pool_spec.

    `modelmake generate` leases the pool (vLLM servers behind Traefik; modelmake.serve.lease): it
    joins the running pool in params.pool_dir on this host or starts one, and the pool stops once its
    last consumer has left. Finished answers are journaled, so a rerun of a killed job regenerates
    only what is missing and duplicates nothing.
    """
    output:
        "generated.jsonl",
    params:
        ready_timeout=config["serve"]["ready_timeout_s"],
        idle_timeout=config["serve"]["idle_timeout_s"],
    log:
        "generate.log",
    conda:
        "../envs/serve.yaml"
    shell:
        "python -m modelmake generate {params.records:q} --out {output:q} --settings {params.settings:q} "
        "--pool-spec {params.pool_spec:q} --pool-folder {params.pool_dir:q} --pool-logs {params.pool_logs:q} "
        "--ready-timeout {params.ready_timeout} --idle-timeout {params.idle_timeout} > {log:q} 2>&1"
