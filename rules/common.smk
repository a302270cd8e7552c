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
