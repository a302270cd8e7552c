# Shared wiring: config validation, the results layout, model references, serving pools and the one
# generation rule every pipeline reuses. Each pipeline's own helpers sit at the top of its rule file.
import json
import re
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from snakemake.exceptions import WorkflowError  # noqa: E402

from modelmake.config import PIPELINES, validate  # noqa: E402
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
TARGETS = []  # each included rules/<pipeline>.smk adds its own; rule all asks for them


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


def asset_corpora():
    """Every split of the datasets named in assets.tokenizer.corpora, reformatted."""
    return [
        data_path(d, "reformatted", f"{s}.parquet")
        for d in config.get("assets", {}).get("tokenizer", {}).get("corpora", [])
        for s in config["datasets"][d]["splits"]
    ]


# --- serving pools and generation (pseudo-labels, arena response pairs, self-play)
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


def pool_folder(pool, *part):
    """Where a serving pool keeps its state (serve/<pool>/...) and its server logs (logs/serve/<pool>/...)."""
    return {"pool_dir": results("serve", pool, *part), "pool_logs": log_path("serve", pool, *part)}


def pool_gpus(servers=None):
    """GPUs a pool's consumer job asks for: the whole pool (one per server) on GPU nodes, else 0.

    Under the slurm profile the consumers of one partition form one group job (one allocation);
    the profile's local-scoped `gpu` limit keeps the group's request to one pool's GPUs.
    """
    s = config["serve"]
    return (servers or s["servers_per_partition"]) if s["gpu"] else 0


def generation_settings(config_key, section, model_source):
    """What `modelmake generate` needs from a section holding the generation settings (schema
    $defs/generation) as JSON; ``config_key`` names that section in errors (e.g. arena.response_pairs)."""
    keys = ["sampling", "max_conversation_tokens", "concurrency", "retries", "max_failure_share"]
    return as_json({"config_key": config_key, "teacher_source": model_source, **{k: section[k] for k in keys}})


# rules/generate.smk holds the one generation rule, declared as a module: each pipeline reuses it under its own
# name (`use rule generate from generation as ...`), giving input, output, log, resources and the
# params records, settings, pool_spec, pool_dir and pool_logs.
module generation:
    snakefile:
        "generate.smk"
    config:
        config
