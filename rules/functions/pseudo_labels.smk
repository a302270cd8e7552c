# pseudo_labels: the pipeline's config slice, results layout and input functions, used by rules/pseudo_labels.smk
# (functions apart from rules, as snakemake --lint asks).

PL = config["pseudo_labels"]


def pl_recipe():
    """The pseudo-label settings that shape a dataset's labels (recorded in its provenance)."""
    keys = ["split", "partitions", "shards_per_partition", "sampling", "max_conversation_tokens", "teacher",
            "regenerate", "ending_user_turn"]
    return {k: PL[k] for k in keys}


def labels_path(dataset, teacher, *parts):
    return results("pseudo_labels", dataset, teacher, *parts)


def pl_partitions():
    return PL["build_partitions"] if PL["build_partitions"] is not None else range(PL["partitions"])


def pseudo_label_targets():
    """The merged datasets when every partition is built here; else this machine's shards."""
    if PL["build_partitions"] is None:
        return [labels_path(d, PL["teacher"], "labels.parquet") for d in PL["datasets"]]
    return [
        labels_path(d, PL["teacher"], f"part{p}", f"shard{s}.jsonl")
        for d in PL["datasets"]
        for p in pl_partitions()
        for s in range(PL["shards_per_partition"])
    ]
