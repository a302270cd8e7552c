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


# --- generation jobs: one per shard, or (pseudo_labels.shards_per_job) one per group of a partition's
# shards, which writes the folder part{p}/group{g} with a file per shard. A job's shards share one
# pool lease; each shard keeps its journal in part{p}/.journal/ either way (modelmake.generate.output_plan).
PL_GROUPED = PL["shards_per_job"] != 1
PL_JOB_SHARDS = job_shards(PL)


def pl_group_shards(group):
    """The shards of a partition that group ``group``'s job writes."""
    return range(group * PL_JOB_SHARDS, min(PL["shards_per_partition"], (group + 1) * PL_JOB_SHARDS))


def pl_generated():
    """A generation job's output: its shard's labels, or its group's folder of them."""
    if PL_GROUPED:
        return directory(labels_path("{dataset}", "{teacher}", "part{part}", "group{group}"))
    return labels_path("{dataset}", "{teacher}", "part{part}", "shard{shard}.jsonl")


def pl_generation_records():
    """A generation job's records: its shard (a plain string with wildcards, no input function:
    10,000 shard jobs plan fast), or its group's shards."""
    if not PL_GROUPED:
        return data_path("{dataset}", "shards", PL["split"], "part{part}", "shard{shard}.jsonl")
    return lambda w: [data_path(w.dataset, "shards", PL["split"], f"part{w.part}", f"shard{s}.jsonl")
                      for s in pl_group_shards(int(w.group))]


def pl_generation_log():
    unit = "group{group}.log" if PL_GROUPED else "shard{shard}.log"
    return log_path("generate", "{dataset}", "{teacher}", "part{part}", unit)


def pl_generated_files(dataset, teacher, parts):
    """What the generation jobs of partitions ``parts`` write: shard files, or group folders."""
    if PL_GROUPED:
        groups = range(-(-PL["shards_per_partition"] // PL_JOB_SHARDS))
        return [labels_path(dataset, teacher, f"part{p}", f"group{g}") for p in parts for g in groups]
    return [labels_path(dataset, teacher, f"part{p}", f"shard{s}.jsonl")
            for p in parts for s in range(PL["shards_per_partition"])]


def pseudo_label_targets():
    """The merged datasets when every partition is built here; else this machine's shard files or group folders."""
    if PL["build_partitions"] is None:
        return [labels_path(d, PL["teacher"], "labels.parquet") for d in PL["datasets"]]
    return [f for d in PL["datasets"] for f in pl_generated_files(d, PL["teacher"], pl_partitions())]
