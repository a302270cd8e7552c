# router: the pipeline's config slice, results layout and input functions, used by rules/router.smk
# (functions apart from rules, as snakemake --lint asks).
from modelmake.router.labels import constraint_body  # noqa: E402

ROUTER = config["router"]
ROUTER_BUILD = ROUTER.get("build_labels")  # None: the labels come from router.data only


def router_path(*parts):
    return results("router", ROUTER["run"], *parts)


def router_labels_path(*parts):
    """Where router.build_labels builds the labels: router/<run>/labels/."""
    return router_path("labels", *parts)


def router_targets():
    """The router's evaluation (metrics, curve; none with router.split.test 0) and calibration."""
    evaluation = [router_path("eval", "metrics.json"), router_path("eval", "curve.png")]
    return [*(evaluation if ROUTER["split"]["test"] > 0 else []), router_path("route", "calibration.json")]


def router_data_sources(wildcards, input):
    """Every source router_data reads, in order: router.data's (files as the rule's inputs give them,
    hub ids as they are), then the built labels."""
    return record_sources(ROUTER["data"], "data")(wildcards, input) + list(input.built)


# --- router.build_labels: prompts -> the weak and the strong model's answers -> the judge's grades
def router_label_role(which):
    """The model role of the weak or the strong model."""
    return ROUTER_BUILD[which]


def router_label_prompt_inputs():
    """The reformatted splits the prompts come from, or the prompt files (local ones)."""
    p = ROUTER_BUILD["prompts"]
    if "datasets" in p:
        return [data_path(d, "reformatted", f"{p['split']}.parquet") for d in p["datasets"]]
    return local_sources(p["files"])


def router_label_prompt_args(wildcards, input):
    """modelmake router-label-prompts' sources: --dataset name=parquet each, or the files in order."""
    p = ROUTER_BUILD["prompts"]
    if "datasets" in p:
        return [a for d, path in zip(p["datasets"], input) for a in ("--dataset", f"{d}={path}")]
    return record_sources(p["files"])(wildcards, input)


def router_judge_settings(retry=False):
    """The judge's generation settings (router.build_labels.grading) with its structured-output
    constraint (modelmake.router.labels.constraint_body): the first reply's, or the retry's."""
    g = ROUTER_BUILD["grading"]
    extra = constraint_body(g["structured"], g["structured_api"], g["scale"], retry=retry)
    return generation_settings("router.build_labels.grading", g, model_source(ROUTER_BUILD["judge"]), extra_body=extra)
