# distill: the pipeline's config slice, results layout and input functions, used by rules/distill.smk
# (functions apart from rules, as snakemake --lint asks).

DI = config["distill"]


def distill_path(*parts):
    return results("distill", DI["name"], *parts)


def distill_chat_inputs():
    """Reformatted chat splits, plus the pseudo-label pipeline's labels when distill.chat.pseudo_labels."""
    chat = DI["chat"]
    paths = [data_path(d, "reformatted", f"{chat['split']}.parquet") for d in chat["datasets"]]
    if chat.get("pseudo_labels"):
        paths += [labels_path(d, PL["teacher"], "labels.parquet") for d in PL["datasets"]]
    return paths


def distill_web_files():
    return [f for files in DI["web"]["files"].values() for f in files]


def distill_stage_settings(n):
    """One stage's training settings as JSON (everything the trainer processes need to agree on)."""
    return as_json({
        **DI[f"stage{n}"], "stage": n, "max_len": DI["max_len"], "seed": config["seed"],
        "collective_timeout_s": DI["service"]["collective_timeout_s"],
    })


def distill_layout():
    return as_json(DI["service"])


def distill_processes():
    """Processes of a stage (its supervisor starts them): a teacher and its trainers per group."""
    s = DI["service"]
    return s["groups"] * (s["ranks_per_group"] + (1 if s["mode"] == "service" else 0))


def distill_targets():
    """The evaluation of the distillation run (it needs every stage). None on a machine that builds only
    some pseudo-label partitions (pseudo_labels.build_partitions) when the distillation trains on the
    labels: like the merge, it runs where every partition is (build_partitions: null)."""
    if DI["chat"].get("pseudo_labels") and PL["build_partitions"] is not None:
        return []
    return [distill_path("eval", "metrics.json"), distill_path("eval", "perplexity.png")]
