# Shared wiring: config validation, the results layout, model references, serving pools and the one
# generation rule every pipeline reuses. Each pipeline's own helpers sit at the top of its rule file.
import json
import re
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from snakemake.exceptions import WorkflowError  # noqa: E402

from modelmake.config import PIPELINES, role_serve, validate  # noqa: E402
from modelmake.errors import ConfigError  # noqa: E402
from modelmake.launch import launch_command, scale_resources, world_size  # noqa: E402
from modelmake.records import is_hub  # noqa: E402

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


def local_sources(sources):
    """The sources of users' records (modelmake.records) that are files or folders: a rule's inputs.
    A hub dataset id (hf://...) is no path; the job reads it itself (record_sources)."""
    return [s for s in sources if not is_hub(s)]


def record_sources(sources, key=None):
    """A param of every source in its order: each file or folder as the rule's input (``key``: the
    named input) gives it, where the job sees it, and each hub id as it is. ``sources``: a list or
    a function of the wildcards."""

    def param(wildcards, input):
        files = input if key is None else getattr(input, key)
        files = iter([files] if isinstance(files, str) else files)
        given = sources(wildcards) if callable(sources) else sources
        return [s if is_hub(s) else next(files) for s in given]

    return param


def asset_corpora():
    """Every split of the datasets named in assets.tokenizer.corpora, reformatted."""
    return [
        data_path(d, "reformatted", f"{s}.parquet")
        for d in config.get("assets", {}).get("tokenizer", {}).get("corpora", [])
        for s in config["datasets"][d]["splits"]
    ]


# --- what jobs ask for: resources.<kind> of the config (schema $defs/job_resources)
def _resource_settings(kind):
    node = config["resources"]
    for k in kind.split("."):
        node = node[k]
    return node


def job_resources(kind, **fixed):
    """The resources of a job of ``kind`` (a key under resources, e.g. "router.train"), named as
    snakemake-executor-plugin-slurm reads them: mem_mb, runtime (minutes), gpu, cpus_per_task, nodes
    (always 1: every job is one machine's processes) and slurm_partition (resources.partitions: cpu
    or gpu by whether the job asks for GPUs). ``fixed``: the figures the pipeline's own settings fix
    (gpus, runtime; x-from in the schema); gpus may be a function of the wildcards.

    cpus_per_task repeats job_threads(kind) for SLURM: Snakemake caps threads at the submitting
    machine's cores (profiles/default: cores: all), the allocation must not be."""
    r = {**_resource_settings(kind), **fixed}
    gpus, part = r["gpus"], config["resources"]["partitions"]
    if callable(gpus):  # per wildcards (e.g. one pool per arena generator)
        partition = lambda w: part["gpu"] if gpus(w) else part["cpu"]  # noqa: E731
    else:
        partition = part["gpu"] if gpus else part["cpu"]
    return {"mem_mb": r["mem_mb"], "runtime": r["runtime"], "gpu": gpus, "cpus_per_task": r["cpus"],
            "nodes": 1, "slurm_partition": partition}


def job_threads(kind):
    """The CPU cores (Snakemake threads; SLURM --cpus-per-task) of a job of ``kind``."""
    return _resource_settings(kind)["cpus"]


# --- serving pools and generation (pseudo-labels, arena response pairs, self-play)
def pool_spec(role, model=None, servers=None, served_name=None):
    """The serving pool of a model role (modelmake.serve.PoolSpec) as JSON: the serve section's
    settings with the role's own (models.<role>.serve) over them.

    ``model``: serve this folder instead of the role's model (e.g. a model the workflow trains from
    it); ``servers``: the pool's size instead of serve.servers_per_partition; ``served_name``: the
    name clients ask for (default: the role).
    """
    s = role_serve(config, role)
    keys = ["max_model_len", "dtype", "tensor_parallel_size", "gpu_memory_utilization", "enforce_eager",
            "cpu_threads_per_server", "cpu_kvcache_gib", "vllm_args", "health_interval_s"]
    return as_json({
        "model": model if model is not None else model_dir(role), "served_name": served_name or role,
        "servers": servers or s["servers_per_partition"], "seed": config["seed"], **{k: s[k] for k in keys},
    })


def pool_folder(pool, *part):
    """Where a serving pool keeps its state (serve/<pool>/...) and its server logs (logs/serve/<pool>/...)."""
    return {"pool_dir": results("serve", pool, *part), "pool_logs": log_path("serve", pool, *part)}


def pool_gpus(role, servers=None):
    """GPUs a pool's consumer job asks for: on GPU nodes the whole pool, servers x the role's
    tensor_parallel_size (each server its own group); 0 on CPUs.

    Under the slurm profile the consumers of one partition form one group job (one allocation);
    the profile's local-scoped `gpu` limit keeps the group's request to one pool's GPUs.
    """
    s = role_serve(config, role)
    return (servers or s["servers_per_partition"]) * s["tensor_parallel_size"] if s["gpu"] else 0


def generation_settings(config_key, section, model_source):
    """What `modelmake generate` needs from a section holding the generation settings (schema
    $defs/generation) as JSON; ``config_key`` names that section in errors (e.g. arena.response_pairs)."""
    keys = ["sampling", "max_conversation_tokens", "concurrency", "retries", "max_failure_share"]
    return as_json({"config_key": config_key, "teacher_source": model_source, **{k: section[k] for k in keys}})


# --- training jobs: every pipeline's training rule scales through its section's `scale` ($defs/scale)
def train_launcher(scale):
    """The shell prefix that starts a training entry point (`<prefix> -m modelmake ...`): python,
    torchrun on one node, or srun + torchrun across the nodes of a SLURM allocation (modelmake.launch)."""
    return launch_command(scale)


def train_resources(kind, scale, processes=None):
    """A training job's resources: job_resources(kind) with the GPUs and nodes of its `scale` (gpu:
    processes x nodes when gpu; across nodes GPUs per node as gres, and mpi and tasks, so that the
    SLURM plugin leaves the srun to the launcher: modelmake.launch.scale_resources).
    ``processes``: per node, when the pipeline lays out its own (distillation's teacher service)."""
    scaled = scale_resources(scale, processes)
    r = job_resources(kind, gpus=world_size(scale, processes) if scale["gpu"] else 0)  # the partition
    if "gres" in scaled:
        del r["gpu"]
    return {**r, **scaled}


# rules/generate.smk holds the one generation rule, declared as a module: each pipeline reuses it under its own
# name (`use rule generate from generation as ...`), giving input, output, log, resources and the
# params records, settings, pool_spec, pool_dir and pool_logs.
module generation:
    snakefile:
        "generate.smk"
    config:
        config
