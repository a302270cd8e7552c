# Shared wiring: config validation, the results layout (every path helper), model references.
import json
import re
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from snakemake.exceptions import WorkflowError  # noqa: E402

from modelmake.config import validate  # noqa: E402
from modelmake.errors import ConfigError  # noqa: E402

try:
    config = validate(config)
except ConfigError as e:
    raise WorkflowError(f"modelmake: {e}") from None

# Jobs find the library in the checkout, whatever environment runs them.
shell.prefix(
    "set -euo pipefail; export PYTHONPATH="
    + shlex.quote(str(Path(workflow.basedir) / "src"))
    + '${{PYTHONPATH:+:$PYTHONPATH}}; '
)

RESULTS = Path(config["results"])


wildcard_constraints:
    dataset=r"[A-Za-z0-9_.-]+",
    split=r"[A-Za-z0-9_-]+",
    teacher=r"[A-Za-z0-9_.-]+",
    name=r"[A-Za-z0-9_.-]+",
    part=r"\d+",
    shard=r"\d+",


def results(*parts):
    return str(RESULTS.joinpath(*parts))


def log_path(*parts):
    return results("logs", *parts)


def bench_path(*parts):
    return results("benchmarks", *parts)


def data_path(dataset, *parts):
    return results("data", dataset, *parts)


def asset_tokenizer():
    return results("assets", "tokenizer")


def asset_model(name):
    return results("assets", "models", name)


def model_dir(role):
    """The folder of a model role: a built demo asset or a path from config."""
    m = config["models"][role]
    return asset_model(m["asset"]) if "asset" in m else m["path"]


def model_inputs(role):
    """Inputs that make a model role: the asset folder when the workflow builds it, else nothing."""
    m = config["models"][role]
    return [asset_model(m["asset"])] if "asset" in m else []


def model_source(role):
    """What identifies a model role's weights, for rerun triggers and provenance."""
    m = config["models"][role]
    return {"asset": m["asset"], **config["assets"]["models"][m["asset"]]} if "asset" in m else {"path": m["path"]}


def as_json(obj):
    """A config slice as compact JSON, to pass to the CLI quoted ({params.x:q})."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


# --- used by rules/assets.smk
def asset_corpora():
    """Every split of the datasets named in assets.tokenizer.corpora, reformatted."""
    return [
        data_path(d, "reformatted", f"{s}.parquet")
        for d in config.get("assets", {}).get("tokenizer", {}).get("corpora", [])
        for s in config["datasets"][d]["splits"]
    ]


# --- used by rules/pseudo_labels.smk
def pool_spec(role, model=None, servers=None):
    """The serving pool of a model role (modelmake.serve.PoolSpec) as JSON.

    ``model``: serve this folder under the name ``role`` instead of the role's model (e.g. a model
    the workflow trains); ``servers``: the pool's size instead of serve.servers_per_partition.
    """
    s = config["serve"]
    return as_json({
        "model": model if model is not None else model_dir(role), "served_name": role,
        "servers": servers or s["servers_per_partition"], "max_model_len": s["max_model_len"],
        "dtype": s["dtype"], "seed": config["seed"], "enforce_eager": s["enforce_eager"],
        "cpu_threads_per_server": s["cpu_threads_per_server"], "cpu_kvcache_gib": s["cpu_kvcache_gib"],
        "vllm_args": s["vllm_args"], "health_interval_s": s["health_interval_s"],
    })


def pool_gpus(servers=None):
    """GPUs a pool's consumer job asks for: the whole pool (one per server) on GPU nodes, else 0.

    Under the slurm profile the consumers of one partition form one group job (one allocation);
    the profile's local-scoped `gpu` limit keeps the group's request to one pool's GPUs.
    """
    s = config["serve"]
    return (servers or s["servers_per_partition"]) if s["gpu"] else 0


PL = config["pseudo_labels"]


def pl_recipe():
    """The pseudo-label settings that shape a dataset's labels (recorded in its provenance)."""
    keys = ["split", "partitions", "shards_per_partition", "sampling", "max_conversation_tokens", "teacher"]
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


# --- used by rules/arena.smk
AR = config.get("arena")
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


def arena_pool_spec(role):
    """The pool of a generator: pool_spec(role) with arena.response_pairs.servers servers."""
    spec = json.loads(pool_spec(role))
    spec["servers"] = AR["response_pairs"]["servers"]
    return as_json(spec)


def arena_targets():
    """The report (every stage, every base, the ensemble) and the submission folders."""
    if AR is None:
        return []
    return [
        arena_path("eval", "metrics.tsv"),
        *[arena_path("submission", b) for b in AR["bases"]],
        arena_path("submission", "ensemble"),
    ]
# --- used by rules/distill.smk
DI = config.get("distill")


def distill_path(*parts):
    return results("distill", DI["name"], *parts)


def distill_chat_inputs():
    """Reformatted chat splits, plus the seed-000 pseudo-labels when distill.chat.pseudo_labels."""
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
        "collective_timeout_s": DI["service"]["collective_timeout_s"], "deepspeed": DI.get("deepspeed"),
    })


def distill_layout():
    return as_json(DI["service"])


def distill_gpus():
    s = DI["service"]
    per_group = s["ranks_per_group"] + (1 if s["mode"] == "service" else 0)
    return s["groups"] * per_group if s["gpu"] else 0


def distill_targets():
    """The evaluation of the distillation run (it needs every stage); nothing without a distill section."""
    if not DI:
        return []
    return [distill_path("eval", "metrics.json"), distill_path("eval", "perplexity.png")]
# --- used by rules/router.smk
ROUTER = config.get("router")


def router_path(*parts):
    return results("router", ROUTER["run"], *parts)


def router_launcher():
    """How the training job starts: one process, or torchrun with router.train.processes of them."""
    n = ROUTER["train"]["processes"]
    return "python" if n == 1 else f"torchrun --standalone --nproc_per_node {n}"


def router_targets():
    """The router's evaluation (metrics, curve) and calibration; nothing when config has no router."""
    if ROUTER is None:
        return []
    return [router_path("eval", "metrics.json"), router_path("eval", "curve.png"),
            router_path("route", "calibration.json")]
# --- used by rules/selfplay.smk
SP = config.get("selfplay") or {"iterations": 0, "run": "none"}


def sp_path(*parts):
    """selfplay/{run}/...: every self-play artifact of the configured run."""
    return results("selfplay", SP["run"], *parts)


def sp_settings(t):
    """Iteration t's train and sampling settings: the section's, updated by per_iteration[t]."""
    over = SP["per_iteration"][t] if t < len(SP["per_iteration"]) else {}
    return {"train": {**SP["train"], **over.get("train", {})},
            "sampling": {**SP["sampling"], **over.get("sampling", {})}}


def sp_recipe(t):
    """What makes iteration t's model (the SFT model, data and every iteration's settings up to t):
    deterministic training makes it an identity of the weights, known before they exist."""
    return {"sft": model_source(SP["sft_model"]), "dataset": config["datasets"][SP["dataset"]],
            "seed": config["seed"], "iterations": [sp_settings(i) for i in range(t + 1)]}


def sp_start_model(t):
    """The model iteration t generates with and starts from (and is regularised towards)."""
    return model_dir(SP["sft_model"]) if t == 0 else sp_path(f"iter{t - 1}", "model")


def sp_start_inputs(t):
    return model_inputs(SP["sft_model"]) if t == 0 else [sp_path(f"iter{t - 1}", "model")]


def sp_start_source(t):
    return model_source(SP["sft_model"]) if t == 0 else {"selfplay": sp_recipe(t - 1)}


def sp_pool(t):
    """Name of the serving pool of iteration t's generation (one pool per generating model)."""
    return f"selfplay-{SP['run']}-iter{t}"


def sp_split(part):
    """The dataset split behind a self-play part name (train | test)."""
    return SP["train_split"] if part == "train" else SP["test_split"]


def sp_generation_settings(w):
    t = int(w.it)
    return as_json({
        "teacher_source": sp_start_source(t),
        "sampling": sp_settings(t)["sampling"],
        "max_conversation_tokens": SP["max_conversation_tokens"],
        "concurrency": SP["concurrency"],
        "retries": SP["retries"],
        "max_failure_share": SP["max_failure_share"],
    })


def sp_generated(w):
    """Every generated fraction of a split (the count is known once the fractions are written)."""
    folder = checkpoints.selfplay_fractions.get(sppart=w.sppart).output[0]
    n = json.loads((Path(folder) / "layout.json").read_text())["fractions"]
    return [sp_path(f"iter{w.it}", "generated", w.sppart, f"frac{k}.jsonl") for k in range(n)]


def sp_targets():
    """Every iteration's model and metrics, and the plot across iterations."""
    if not SP["iterations"]:
        return []
    return [sp_path(f"iter{t}", "model") for t in range(SP["iterations"])] + [
        sp_path("metrics.png"), sp_path("metrics.json")]
