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
def pool_spec(role):
    """The serving pool of a model role (modelmake.serve.PoolSpec) as JSON."""
    s = config["serve"]
    return as_json({
        "model": model_dir(role), "served_name": role,
        "servers": s["servers_per_partition"], "max_model_len": s["max_model_len"],
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
