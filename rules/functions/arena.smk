# arena: the pipeline's config slice, results layout and input functions, used by rules/arena.smk
# (functions apart from rules, as snakemake --lint asks).

AR = config["arena"]
STAGES = ["stage1", "stage2", "stage3"]
PSEUDO_SOURCES = ["unlabelled", "generated"]


def arena_path(*parts):
    return results("arena", AR["run"], *parts)


def arena_model(stage, base):
    return arena_path(stage, base, "model")


def arena_stage_settings(stage):
    """What shapes a stage's model: template, training settings, validation fold (passed as JSON)."""
    return as_json({"template": AR["template"], "train": AR[stage], "valid_fold": AR["valid_fold"]})


def arena_stage_inputs(stage, base):
    """A stage's starting point and data: stage 1 and 2 start from the base, stage 3 from stage 2;
    stage 2 trains on the pseudo-labelled pairs, the others on the labelled training folds."""
    init = arena_model("stage2", base) if stage == "stage3" else model_dir(base)
    out = {"init": init, "labelled": arena_path("data", "labelled.parquet"),
           "pseudo": [arena_path("pseudo", f"{s}.parquet") for s in PSEUDO_SOURCES] if stage == "stage2" else []}
    return out


def arena_source_pairs(source):
    return arena_path("data", "unlabelled.parquet") if source == "unlabelled" else arena_path("pairs", "pairs.parquet")


def arena_targets():
    """The report (every stage, every base, the ensemble) and the submission folders."""
    return [
        arena_path("eval", "metrics.tsv"),
        *[arena_path("submission", b) for b in AR["bases"]],
        arena_path("submission", "ensemble"),
    ]
