# The one generation rule: answer the conversations of a jsonl file through a leased serving pool.
# Not used as it stands: each pipeline takes it under its own name (`use rule generate from
# generation as ...`; rules/common.smk declares the module) with its own input, output, log, params.


rule generate:
    """Answer every conversation of params.records through the pool of params.pool.

    `modelmake generate` leases the pool (vLLM servers behind Traefik; modelmake.serve.lease): it
    joins the running pool in its folder on this host or starts one, and the pool stops once its
    last consumer has left. Finished answers are journaled, so a rerun of a killed job regenerates
    only what is missing and duplicates nothing. params.records may list several files: the output
    is then a folder (no .jsonl name) that gets a file per records file, named as it, each journaled
    on its own beside the folder, all through one lease.
    """
    output:
        "generated.jsonl",
    log:
        "generate.log",
    conda:
        "../envs/serve.yaml"
    shell:
        "python -m modelmake generate {params.records:q} --out {output:q} --settings {params.settings:q} "
        "--pool {params.pool:q} > {log:q} 2>&1"
