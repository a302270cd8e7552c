# Shared wiring: config validation, the results layout, model references, serving pools and the one
# generation rule every pipeline reuses. Each pipeline's own helpers sit at the top of its rule file.
import json
import re
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from snakemake.exceptions import WorkflowError  # noqa: E402

from modelmake.config import PIPELINES, job_shards, parse_built, role_serve, validate  # noqa: E402
from modelmake.errors import ConfigError  # noqa: E402
from modelmake.files import digest  # noqa: E402
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
    group=r"\d+",


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


def built_model_dir(ref):
    """The folder a pipeline writes for a built-model reference (models.<role>.built, parsed and checked
    by modelmake.config.parse_built): the one map from references to paths, through each pipeline's
    own path helper (rules/functions/<pipeline>.smk, included before any rule)."""
    pipeline, at = parse_built(config, ref)
    if pipeline == "selfplay":
        return sp_path(f"iter{at['iteration']}", "model")
    if pipeline == "distill":
        return distill_path(f"stage{at['stage']}", "model")
    if pipeline == "router":
        return router_path("model")
    return arena_model(f"stage{at['stage']}", at["base"])


def model_dir(role):
    """The folder of a model role: a built demo asset, a model a pipeline builds, or a path from config."""
    m = config["models"][role]
    if "asset" in m:
        return asset_model(m["asset"])
    return built_model_dir(m["built"]) if "built" in m else m["path"]


def model_inputs(role):
    """Inputs that make a model role: the folder when the workflow builds it (a demo asset, or a model
    of a pipeline: the edge from its rule), else nothing (a path from config)."""
    m = config["models"][role]
    return [model_dir(role)] if "asset" in m or "built" in m else []


def model_source(role):
    """What identifies a model role's weights, for rerun triggers and provenance. A built model is named
    by its reference and folder; its weights' changes reach consumers as input changes (and the
    generation journal's fingerprint holds its manifest's digest: modelmake generate)."""
    m = config["models"][role]
    if "asset" in m:
        return {"asset": m["asset"], **config["assets"]["models"][m["asset"]]}
    if "built" in m:
        return {"built": m["built"], "path": built_model_dir(m["built"])}
    return {"path": m["path"]}


# snakemake --report: a section (category) per pipeline, in the order of PIPELINES; captions in
# report/<name>.rst say what each figure or table shows and what to look for.
REPORT_SECTIONS = {"pseudo_labels": "Pseudo-labels", "router": "Router", "selfplay": "Self-play",
                   "arena": "Arena", "distill": "Distillation"}


def report_item(path, caption, pipeline, subcategory):
    """``path`` flagged for the report under its pipeline's section and ``subcategory`` (wildcards
    allowed, e.g. "Iteration {it}"), captioned by report/<caption>.rst."""
    return report(path, caption=f"../report/{caption}.rst", category=REPORT_SECTIONS[pipeline],
                  subcategory=subcategory)


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
def generation_pool(role, where="part0", model=None, servers=None, name=None, label=None):
    """The serving pool a generation job leases (params.pool of the generation rule: `modelmake generate
    --pool`), as JSON: its spec (modelmake.serve.PoolSpec: the serve section's settings with the role's
    own, models.<role>.serve, over them), its folder and log folder, serve's ready and idle timeouts,
    and the label the generated records give the model.

    A pool is one model served one way, named by both: serve/<name>-<hash of the spec>/<where> (logs
    likewise; a subfolder per host, and per allocation under SLURM). So every generation job that
    serves the same model with the same settings joins one pool, whichever pipeline it belongs to:
    the demo's pseudo-label teacher, arena generator arena_a and self-play's first iteration all serve
    tiny-llama from one pool. Settings that differ (a role's own serve keys, the pool's size) make
    another pool.

    ``where``: which of the model's pools (pseudo-labels: one per partition, "part{part}", wildcards
    allowed); ``model``: serve this folder instead of the role's (a model the workflow trains from it);
    ``servers``: the pool's size instead of serve.servers_per_partition; ``name``: the pool's and the
    served model's name (default: the model folder's, e.g. tiny-llama); ``label``: what the
    records call the model (default: the role). One param, not several: a job's params and shell
    fields are what Snakemake spends its planning time on, per job.
    """
    s = role_serve(config, role)
    keys = ["max_model_len", "dtype", "tensor_parallel_size", "gpu_memory_utilization", "enforce_eager",
            "cpu_threads_per_server", "cpu_kvcache_gib", "cpu_engine_in_process", "vllm_args", "health_interval_s",
            "device_lock_dir"]
    folder = model if model is not None else model_dir(role)
    spec = {"model": folder, "served_name": name or Path(folder).name, "servers": servers or s["servers_per_partition"],
            "seed": config["seed"], **{k: s[k] for k in keys}}
    pool = f"{spec['served_name']}-{digest(spec, 8)}"
    return as_json({"spec": spec, "folder": results("serve", pool, where), "logs": log_path("serve", pool, where),
                    "label": label or role, "ready_timeout_s": config["serve"]["ready_timeout_s"],
                    "idle_timeout_s": config["serve"]["idle_timeout_s"]})


def pool_gpus(role, servers=None):
    """GPUs a pool's consumer job asks for: on GPU nodes the whole pool, servers x the role's
    tensor_parallel_size (each server its own group); 0 on CPUs.

    Under the slurm profile the consumers of one partition form one group job (one allocation);
    the profile's local-scoped `gpu` limit keeps the group's request to one pool's GPUs.
    """
    s = role_serve(config, role)
    return (servers or s["servers_per_partition"]) * s["tensor_parallel_size"] if s["gpu"] else 0


def generation_settings(config_key, section, model_source, extra_body=None):
    """What `modelmake generate` needs from a section holding the generation settings (schema
    $defs/generation) as JSON; ``config_key`` names that section in errors (e.g. arena.response_pairs).
    ``extra_body``: more fields of every request (the router judge's structured outputs)."""
    keys = ["sampling", "max_conversation_tokens", "concurrency", "retries", "max_failure_share"]
    keys += [k for k in ("regenerate", "ending_user_turn") if k in section]  # pseudo_labels' own
    extra = {"extra_body": extra_body} if extra_body is not None else {}
    return as_json({"config_key": config_key, "teacher_source": model_source, **{k: section[k] for k in keys},
                    **extra})


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
# params records, settings (generation_settings) and pool (generation_pool).
module generation:
    snakefile:
        "generate.smk"
    config:
        config
