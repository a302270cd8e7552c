"""config.yaml: validation against schemas/config.schema.yaml plus the checks a schema cannot make.

Errors name the key path (``serve.max_model_len``), what was found and what is expected, and are
raised as :class:`ConfigError` before any job runs. Paths marked ``x-path`` in the schema must
exist (relative to the working directory); ``x-path: source`` values, users' records, must be
sources :mod:`modelmake.records` reads (a hub id is not checked: that needs the hub); ``x-path:
model`` a model folder with what loading it needs (:func:`model_folder_problem`). Every number must
be finite (jsonschema takes YAML's ``.inf`` for a number), and vLLM arguments may not set what a
pool sets itself (``--host``, ``--port``, ...: :func:`vllm_args_problems`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from pathlib import Path
from typing import Any

from modelmake.errors import ConfigError

SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "config.schema.yaml"


# The pipelines, in the order the workflow includes them (pseudo-labels first: distillation may
# train on them). A pipeline is built if and only if its section is in the config.
PIPELINES = ("pseudo_labels", "router", "selfplay", "arena", "distill")


def key_path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _resolve(schema: dict, root: dict) -> dict:
    """A schema node with its ``$ref`` merged in: the referenced definition, then the node's own keys
    (``properties`` merged property by property, ``required`` unioned)."""
    if "$ref" not in schema:
        return schema
    base = dict(_resolve(root["$defs"][schema["$ref"].rsplit("/", 1)[-1]], root))
    for k, v in schema.items():
        if k == "$ref":
            continue
        if k == "properties":
            props = dict(base.get("properties", {}))
            for name, sub in v.items():
                props[name] = {**props.get(name, {}), **sub}
            base["properties"] = props
        elif k == "required":
            base["required"] = list(dict.fromkeys([*base.get("required", []), *v]))
        else:
            base[k] = v
    return base


def _children(schema: dict, value: Any, root: dict):
    """(key, resolved sub-schema, sub-value) of every member of an object or list value."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for k, v in value.items():
            sub = props.get(k, extra)
            if isinstance(sub, dict):
                yield k, _resolve(sub, root), v
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            yield i, _resolve(schema["items"], root), v


def _with_defaults(schema: dict, value: Any, root: dict) -> Any:
    """Fill schema defaults into a config (objects only, recursively; not into list items, such as
    selfplay.per_iteration's overrides, where a default would override the value laid under it)."""
    schema = _resolve(schema, root)
    if isinstance(value, dict) and schema.get("type") == "object":
        for k, sub in schema.get("properties", {}).items():
            if k not in value and "default" in sub:
                value[k] = copy.deepcopy(sub["default"])
        for k, sub, v in list(_children(schema, value, root)):
            value[k] = _with_defaults(sub, v, root)
    return value


def schema() -> dict:
    """schemas/config.schema.yaml, read once. The one source of every setting's default: the library
    asks :func:`default`, :func:`defaults` and :func:`fill_defaults` instead of keeping values of its own."""
    return _read_schema(SCHEMA)


@functools.cache
def _read_schema(path: Path) -> dict:
    """A schema file, parsed once, with libyaml where PyYAML has it (the pure-Python parser takes a
    tenth of a second of every Snakemake start for this file). Callers do not change it."""
    import yaml

    return yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def schema_at(where: str) -> dict:
    """The schema node (``$ref`` merged in) of a config key: ``router.train`` or ``router.train.lr``
    (a section's properties, by dotted path), ``$defs.selfplay_train.beta`` (a definition's), or a
    JSON pointer such as ``#/$defs/generation``."""
    root = schema()
    if where.startswith("#/"):
        path = [seg.replace("~1", "/").replace("~0", "~") for seg in where[2:].split("/") if seg]
    else:
        keys = where.split(".")
        head, keys = (["$defs", keys[1]], keys[2:]) if keys[0] == "$defs" and len(keys) > 1 else ([], keys)
        path = head + [x for k in keys for x in ("properties", k)]
    node = root
    for i, seg in enumerate(path):
        node = _resolve(node, root)
        if not isinstance(node, dict) or seg not in node:
            raise KeyError(f"the schema has no {where!r} ({'/'.join(path[: i + 1])} is missing)")
        node = node[seg]
    return _resolve(node, root)


def default(where: str) -> Any:
    """The schema's default of one key (see :func:`schema_at` for ``where``), a fresh copy."""
    node = schema_at(where)
    if "default" not in node:
        raise KeyError(f"the schema gives {where!r} no default")
    return copy.deepcopy(node["default"])


def defaults(where: str) -> dict:
    """Every default of an object in the schema (nested objects with defaults too)."""
    return fill_defaults(where, {})


def fill_defaults(where: str, given: dict | None = None, *, check: str | None = None) -> dict:
    """``given`` (a settings dict, e.g. a config slice) filled with the schema's defaults for the
    object at ``where``; ``given`` is not changed. With ``check`` (the config key errors name), a
    key the schema does not list raises :class:`ConfigError`."""
    node = schema_at(where)
    given = dict(given or {})
    if check is not None:
        allowed = node.get("properties", {})
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            raise ConfigError(f"{check}: unknown keys {unknown}; allowed: {sorted(allowed)}")
    return _with_defaults(node, copy.deepcopy(given), schema())


def schema_field(where: str) -> Any:
    """A dataclass field whose default is the schema's default of ``where``, read when an instance is
    made: typed settings with the schema's defaults and no copy of them."""
    return dataclasses.field(default_factory=functools.partial(default, where))


def _annotated(schema: dict, value: Any, root: dict, mark: str, at: tuple = (), parent: Any = None,
               types: tuple = (str,)):
    """Yield (key path, value, annotation, parent object) for every value of ``types`` the schema
    marks with ``mark`` (x-path, x-ref, x-from), walking objects and lists."""
    schema = _resolve(schema, root)
    if mark in schema and isinstance(value, types):
        yield at, value, schema[mark], parent
    for k, sub, v in _children(schema, value, root):
        parent_now = value if isinstance(value, dict) else parent
        yield from _annotated(sub, v, root, mark, at + (k,), parent_now, types)


def _lookup(config: dict, dotted: list[str]):
    node = config
    for k in dotted:
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return node


def _ref_problems(config: dict, at: tuple, value: str, ref: str, parent: dict) -> list[str]:
    """``value`` must be a key of the section ``ref`` names (x-ref). A ``{sibling}`` part of ``ref``
    takes the sibling's value, each item of it when it is a list; a sibling that is itself a bad
    reference is reported at its own key, not here."""
    parts, templated = [[]], "{" in ref
    for seg in ref.split("."):
        if seg.startswith("{") and seg.endswith("}"):
            v = (parent or {}).get(seg[1:-1])
            parts = [p + [str(x)] for p in parts for x in (v if isinstance(v, list) else [v])]
        else:
            parts = [p + [seg] for p in parts]
    out = []
    for dotted in parts:
        container = _lookup(config, dotted)
        if container is None and templated and _lookup(config, dotted[:-1]) is None:
            continue  # the sibling it depends on names nothing: reported there
        if not isinstance(container, dict) or value not in container:
            name = ".".join(dotted)
            what = f"a split of {name[: -len('.splits')]}" if dotted[-1] == "splits" else f"a key of {name}"
            out.append(f"{key_path(at)}: {value!r} is not {what}")
    return out


def model_folder_problem(path: str | Path) -> str | None:
    """What a Hugging Face model folder lacks for modelmake to plan on it: its config.json (or None).
    Tokenizer files and weights are not looked for here: a dry run plans on folders that hold only
    their config (a cluster config's models checked from a login node), and the job that loads the
    tokenizer fails there, with transformers' error naming the folder."""
    path = Path(path)
    if not path.is_dir():
        return f"dir {str(path)!r} does not exist (relative to {Path.cwd()})"
    if not (path / "config.json").is_file():
        return (f"{str(path)!r} is not a model folder: no config.json. Give a folder saved with "
                f"save_pretrained (model and tokenizer), e.g. a downloaded hub snapshot")
    return None


def _non_finite(value: Any, at: tuple = ()):
    """(key path, value) of every float that is infinite or not a number."""
    if isinstance(value, float) and not math.isfinite(value):
        yield at, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _non_finite(v, at + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _non_finite(v, at + (i,))


def validate(config: dict, schema_path: str | Path = SCHEMA, check_paths: bool = True) -> dict:
    """Return the config with defaults filled in, or raise ConfigError listing every problem."""
    import jsonschema

    schema = _read_schema(Path(schema_path))
    validator = jsonschema.Draft202012Validator(schema)
    problems = []
    for err in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path))):
        where = key_path(err.absolute_path)
        if err.validator in ("additionalProperties", "unevaluatedProperties"):
            allowed = ", ".join(sorted(_resolve(err.schema, schema).get("properties", {}))) or "see the schema"
            problems.append(f"{where}: {err.message}; allowed keys: {allowed}")
        elif err.validator == "dependentRequired":
            missing = err.message.split("'")[1]
            needs = next(k for k, v in err.schema["dependentRequired"].items() if missing in v and k in err.instance)
            problems.append(f"{missing}: required when the config has a {needs} section")
        elif err.validator == "oneOf" and all("required" in r for r in err.schema["oneOf"]):
            # a choice of keys (models.<name>: asset or path); a non-object already fails "type"
            if isinstance(err.instance, dict):
                keys = ", ".join(k for r in err.schema["oneOf"] for k in r["required"])
                problems.append(f"{where}: give exactly one of {keys}")
            elif err.schema.get("type") != "object":
                problems.append(f"{where}: {err.message}")
        elif "propertyNames" in err.schema_path:
            problems.append(f"{where}: {err.instance!r} is not a valid name: {err.schema.get('description', err.message)}")
        elif err.validator in ("oneOf", "anyOf") and err.context:
            # say what each alternative expected, not just that none matched
            why = "; ".join(dict.fromkeys(e.message for e in err.context))
            problems.append(f"{where}: {err.instance!r} matches none of the allowed forms ({why})")
        else:
            problems.append(f"{where}: {err.message}")
    problems += [f"{key_path(at)}: {v!r} is not a finite number; give one (a timeout of .inf never ends)"
                 for at, v in _non_finite(config)]
    if problems:
        raise ConfigError(_report(problems, schema_path))
    problems += _map_old_scale_keys(config)
    if problems:
        raise ConfigError(_report(problems, schema_path))
    config = _with_defaults(schema, config, schema)
    problems += _built_label_scores(config)
    for at, value, ref, parent in _annotated(schema, config, schema, "x-ref"):
        problems += _ref_problems(config, at, value, ref, parent)
    for at, _, source, _ in _annotated(schema, config, schema, "x-from", types=(object,)):
        problems.append(f"{key_path(at)}: set by {source}; remove it here")
    for at, value, _, _ in _annotated(schema, config, schema, "x-built"):
        try:
            parse_built(config, value)
        except ValueError as e:
            problems.append(f"{key_path(at)}: {e}")
    problems += _cross_checks(config)
    if check_paths:
        from modelmake.records import source_problem

        for at, p, kind, _ in _annotated(schema, config, schema, "x-path"):
            if kind == "source":  # users' records: a file of a known format, a datasets folder, a hub id
                problem = source_problem(p)
                if problem:
                    problems.append(f"{key_path(at)}: {problem}")
                continue
            if kind == "model":
                problem = model_folder_problem(p)
                if problem:
                    problems.append(f"{key_path(at)}: {problem}")
                continue
            path = Path(p)
            if not (path.is_file() if kind == "file" else path.is_dir()):
                problems.append(f"{key_path(at)}: {kind} {p!r} does not exist (relative to {Path.cwd()})")
    if problems:
        raise ConfigError(_report(problems, schema_path))
    return config


# Keys that said how a training job scales before each section had a `scale` ($defs/scale), and
# what they are now: (old key, scale section, {scale key: value}) from the old value.
OLD_SCALE_KEYS = (
    ("router.train.processes", "router.scale", lambda v: {"processes": v}),
    ("router.train.gpu", "router.scale", lambda v: {"gpu": True, "processes": v} if v else {"gpu": False}),
    ("router.train.deepspeed", "router.scale", lambda v: {"deepspeed": v}),
    ("router.train.bf16", "router.scale", lambda v: {"precision": "bf16" if v else "fp32"}),
    ("router.train.gradient_checkpointing", "router.scale", lambda v: {"gradient_checkpointing": v}),
    ("arena.gpu", "arena.scale", lambda v: {"gpu": bool(v)}),
    ("selfplay.train_gpus", "selfplay.scale", lambda v: {"gpu": True, "processes": v} if v else {"gpu": False}),
    ("distill.service.gpu", "distill.scale", lambda v: {"gpu": v}),
    ("distill.deepspeed", "distill.scale", lambda v: {"deepspeed": v}),
)


def _map_old_scale_keys(config: dict) -> list[str]:
    """Move the old keys of :data:`OLD_SCALE_KEYS` into their section's ``scale`` (in place), so the
    workflow reads one place; a problem where an old and a new key (or two old ones) disagree."""
    problems, given = [], {}  # scale key path -> (value, the key that set it)
    for old, section, new in OLD_SCALE_KEYS:
        *parents, last = old.split(".")
        holder = _lookup(config, parents)
        if not isinstance(holder, dict) or last not in holder:
            continue
        scale_at = section.split(".")
        if _lookup(config, scale_at[:-1]) is None:
            continue
        scale = _lookup(config, scale_at[:-1]).setdefault(scale_at[-1], {})
        if not isinstance(scale, dict):
            continue  # the schema reported it
        for key, value in new(holder.pop(last)).items():
            where = f"{section}.{key}"
            if where in given and given[where][0] != value:
                problems.append(f"{old}: says {key} {value!r}, {given[where][1]} says {given[where][0]!r}; "
                                f"give {where} once")
            elif key in scale and where not in given and scale[key] != value:
                problems.append(f"{old} (the old name of {where}) and {where} disagree: "
                                f"{value!r} vs {scale[key]!r}; keep {where} only")
            else:
                scale[key] = value
                given[where] = (value, old)
    return problems


def _report(problems: list[str], schema_path) -> str:
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"config.yaml does not match {schema_path}:\n{lines}\nFix these keys and run again."


# A grouped generation job names each of its shard files on its command line, which Snakemake runs
# as one `bash -c` argument (Linux: 128 KiB); 1,000 absolute paths of ~100 bytes stay well inside.
MAX_SHARDS_PER_JOB = 1000


def job_shards(pl: dict) -> int:
    """How many of a partition's shards one pseudo-label generation job writes (the pseudo_labels
    section, defaults filled: shards_per_job 1, N or partition, capped at shards_per_partition)."""
    per_job, shards = pl.get("shards_per_job", 1), pl["shards_per_partition"]
    return shards if per_job == "partition" else min(per_job, shards)


def _cross_checks(c: dict) -> list[str]:
    """What the schema's annotations cannot say: constraints between values of different keys.
    (References to keys of other sections are x-ref annotations; paths that must exist, x-path.)"""
    out = []
    if any("asset" in m for m in c["models"].values()) and "tokenizer" not in c.get("assets", {}):
        out.append("assets.tokenizer: required when a model is built from assets")
    pl = c.get("pseudo_labels")
    if pl:
        for i, p in enumerate(pl.get("build_partitions") or []):
            if p >= pl["partitions"]:
                out.append(f"pseudo_labels.build_partitions[{i}]: {p} is not below partitions={pl['partitions']}")
        if (per_job := job_shards(pl)) > MAX_SHARDS_PER_JOB:
            out.append(f"pseudo_labels.shards_per_job: {per_job} shards in one job; at most "
                       f"{MAX_SHARDS_PER_JOB} (the job's command line names each shard file, and Linux "
                       f"caps one argument at 128 KiB): give shards_per_job: {MAX_SHARDS_PER_JOB} or "
                       f"fewer shards_per_partition")
    for key, roles in generating_roles(c).items():
        budget = _lookup(c, key.split("."))["max_conversation_tokens"]
        for role in roles:
            if role not in c["models"]:
                continue  # reported by its x-ref
            limit = role_serve(c, role)["max_model_len"]
            if budget > limit:
                own = "max_model_len" in c["models"][role].get("serve", {})
                where = (f"models.{role}.serve.max_model_len={limit}" if own
                         else f"serve.max_model_len={limit} (the max_model_len of {role})")
                out.append(f"{key}.max_conversation_tokens: {budget} exceeds {where}")
    if "arena" in c:
        from modelmake.arena.checks import cross_checks

        out += cross_checks(c)
    out += _distill_checks(c) + _router_checks(c) + _selfplay_checks(c) + _scale_checks(c) + _vllm_args_checks(c)
    out += _built_model_checks(c)
    return out


# vLLM flags a pool sets itself: in vllm_args they would override it without a word
POOL_FLAGS = {
    "--model": "the model role's path or asset", "--served-model-name": "the model role's name",
    "--host": "none: servers listen on 127.0.0.1, reached through the pool's proxy",
    "--port": "none: each server gets a free port", "--api-key": "none: each pool generates its own key",
    "--max-model-len": "{serve}.max_model_len", "--dtype": "{serve}.dtype", "--seed": "seed",
    "--tensor-parallel-size": "{serve}.tensor_parallel_size",
    "--gpu-memory-utilization": "{serve}.gpu_memory_utilization", "--enforce-eager": "{serve}.enforce_eager",
}


def vllm_args_problems(args: list[str], key: str) -> list[str]:
    """``key`` (``serve.vllm_args``, ``models.<role>.serve.vllm_args``): each flag the pool sets itself."""
    serve_key = key.rsplit(".", 1)[0]
    out = []
    for a in args:
        if not a.startswith("-"):
            continue
        name = a.split("=", 1)[0]
        flag = "--tensor-parallel-size" if name == "-tp" else "--" + name.lstrip("-").replace("_", "-")
        if flag in POOL_FLAGS:
            use = POOL_FLAGS[flag].format(serve=serve_key)
            out.append(f"{key}: {a} is set by the pool; "
                       + (f"set {use} instead" if not use.startswith("none") else use[len("none: "):]))
    return out


def _vllm_args_checks(c: dict) -> list[str]:
    """vllm_args (the serve section's, each role's) may not set what a pool sets itself."""
    out = vllm_args_problems(c.get("serve", {}).get("vllm_args", []), "serve.vllm_args")
    for role, m in c["models"].items():
        out += vllm_args_problems(m.get("serve", {}).get("vllm_args", []), f"models.{role}.serve.vllm_args")
    return out


def role_serve(c: dict, role: str) -> dict:
    """How a model role is served: the serve section (defaults filled in) with the role's own
    models.<role>.serve keys over it."""
    return {**c["serve"], **c["models"][role].get("serve", {})}


def generating_roles(c: dict) -> dict[str, list[str]]:
    """The model roles each generating section serves (its key -> roles), for the sections present:
    pseudo-labels' teacher, the arena's generators, self-play's SFT model (every iteration's model
    is served with its settings)."""
    out = {}
    if "pseudo_labels" in c:
        out["pseudo_labels"] = [c["pseudo_labels"]["teacher"]]
    if "arena" in c:
        out["arena.response_pairs"] = list(c["arena"]["response_pairs"]["generators"])
    if "selfplay" in c:
        out["selfplay"] = [c["selfplay"]["sft_model"]]
    built = (c.get("router") or {}).get("build_labels")
    if built:
        out["router.build_labels.answers"] = [built["weak"], built["strong"]]
        out["router.build_labels.grading"] = [built["judge"]]
    return out


def _scale_checks(c: dict) -> list[str]:
    """Each pipeline's ``scale``: what it offers (modelmake.launch.scale_problems)."""
    from modelmake.launch import scale_problems

    offers = {"router": {"lora_with_deepspeed": False}, "arena": {"zero3": False}, "selfplay": {"zero3": False},
              "distill": {"lora": False, "multi_process": False}}
    return [p for name, kw in offers.items() if name in c
            for p in scale_problems(c[name]["scale"], f"{name}.scale", **kw)]


def _distill_checks(c: dict) -> list[str]:
    d = c.get("distill")
    if not d:
        return []
    out = []
    if not d["chat"]["datasets"] and not d["chat"].get("pseudo_labels"):
        out.append("distill.chat: name at least one dataset or set pseudo_labels: true")
    if d["chat"].get("pseudo_labels") and "pseudo_labels" not in c:
        out.append("distill.chat.pseudo_labels: true needs a pseudo_labels section (whose labels it trains on)")
    return out


def _built_label_scores(c: dict) -> list[str]:
    """With router.build_labels, router.scores names the built scores: weak and strong are its model
    roles, scale the judge's. Fills them in (in place); a value given that says otherwise is a problem."""
    r = c.get("router")
    built = (r or {}).get("build_labels")
    if not built:
        return []
    out, s = [], r["scores"]
    for key, value, source in (("weak", built["weak"], "router.build_labels.weak"),
                               ("strong", built["strong"], "router.build_labels.strong"),
                               ("scale", built["grading"]["scale"], "router.build_labels.grading.scale")):
        if s.get(key) is not None and s[key] != value:
            out.append(f"router.scores.{key}: {s[key]!r}, but the built labels' scores are named by {source} "
                       f"({value!r}); remove router.scores.{key} (it is set from there) or make them equal")
        s[key] = value
    return out


def _router_checks(c: dict) -> list[str]:
    r = c.get("router")
    if r is None:
        return []
    out = []
    built = r.get("build_labels")
    if not r["data"] and not built:
        out.append("router.data: no records to train on: list sources here, or add router.build_labels to build "
                   "the labels in the workflow")
    if built:
        from modelmake.router.labels import template_problems

        if built["weak"] == built["strong"]:
            out.append(f"router.build_labels.strong: {built['strong']!r} is the weak model too; routing needs two")
        g = built["grading"]
        out += template_problems(g["prompt"], "router.build_labels.grading.prompt")
        if not g["scale"]["min"] < g["scale"]["max"]:
            out.append(f"router.build_labels.grading.scale: min {g['scale']['min']} must be below max "
                       f"{g['scale']['max']}")
    if r["split"]["calib"] + r["split"]["test"] >= 1:
        out.append("router.split: calib + test must leave records to train on (sum below 1)")
    s = r["scores"]
    for role in ("weak", "strong"):
        if s[role] is not None and r["fields"].get(f"{role}_score"):
            out.append(f"router.scores.{role} and router.fields.{role}_score both say where the {role} model's "
                       "score is: keep one")
    scale, labels = s["scale"], s["labels"]
    if scale and not scale["min"] < scale["max"] and not built:  # a built scale is checked above
        out.append(f"router.scores.scale: min {scale['min']} must be below max {scale['max']}")
    if isinstance(labels, list) and any(a >= b for a, b in zip(labels, labels[1:])):
        out.append(f"router.scores.labels: the cut points {labels} must be ascending")
    if isinstance(labels, dict):
        for k in labels:
            try:
                v = float(k)
            except (TypeError, ValueError):
                out.append(f"router.scores.labels: the key {k!r} is not a score (a number)")
                continue
            if scale and not scale["min"] <= v <= scale["max"]:
                out.append(f"router.scores.labels: the score {k} is outside router.scores.scale "
                           f"[{scale['min']}, {scale['max']}]")
    return out


def _selfplay_checks(c: dict) -> list[str]:
    sp = c.get("selfplay")
    if sp and len(sp["per_iteration"]) > sp["iterations"]:
        return [f"selfplay.per_iteration: {len(sp['per_iteration'])} entries for {sp['iterations']} iterations"]
    return []


# --- built models: a model role naming a model that a pipeline of this config builds
# (models.<role>.built, schema x-built). The workflow maps a reference to the folder its pipeline
# writes (rules/common.smk built_model_dir, through each pipeline's own path helper), so the DAG has
# the edge from the producing rule to every consumer.

# What each pipeline's models are, for the roles that use them: a plain causal LM (vLLM serves it,
# transformers loads it without remote code), the distilled RWKV-hybrid student (its own model code),
# or the arena's pairwise classifiers (a score head, no LM head).
BUILT_KINDS = {"selfplay": "causal_lm", "router": "causal_lm", "distill": "hybrid", "arena": "classifier"}
BUILT_FORMS = ("selfplay/iter<t> (or selfplay: the last iteration), distill/stage<0|1|2> (or distill: "
               "stage 2), router, arena/stage<1|2|3>/<base>")


def parse_built(c: dict, ref: str) -> tuple[str, dict]:
    """``(pipeline, where)`` of a built-model reference (models.<role>.built): ``selfplay/iter1`` ->
    ``("selfplay", {"iteration": 1})``, ``distill`` -> ``("distill", {"stage": 2})``, ``router`` ->
    ``("router", {})``, ``arena/stage3/arena_a`` -> ``("arena", {"stage": 3, "base": "arena_a"})``.

    ValueError (its text for the config error) when the form is unknown, the pipeline has no section
    in ``c`` or the iteration, stage or base does not exist there."""
    if not isinstance(ref, str):
        raise ValueError(f"{ref!r} is not a reference; give one of {BUILT_FORMS}")
    pipeline, *rest = ref.strip("/").split("/")
    if pipeline not in BUILT_KINDS:
        raise ValueError(f"{ref!r}: no pipeline {pipeline!r} builds models; give one of {BUILT_FORMS}")
    section = c.get(pipeline)
    if not isinstance(section, dict):
        raise ValueError(f"{ref!r} names a model the {pipeline} pipeline builds, but the config has no "
                         f"{pipeline} section; add it or name another model")

    def number(part: str, prefix: str, allowed: range, what: str) -> int:
        if not (part.startswith(prefix) and part[len(prefix):].isdigit()):
            raise ValueError(f"{ref!r}: {part!r} is not {prefix}<n>; give one of {BUILT_FORMS}")
        n = int(part[len(prefix):])
        if n not in allowed:
            raise ValueError(f"{ref!r}: there is no {prefix}{n}: {what}")
        return n

    if pipeline == "selfplay":
        iterations = section.get("iterations", 0)
        if iterations < 1:
            raise ValueError(f"{ref!r}: selfplay.iterations is {iterations}, so self-play builds no model")
        if len(rest) > 1:
            raise ValueError(f"{ref!r}: give selfplay/iter<t> or selfplay")
        t = (number(rest[0], "iter", range(iterations), f"selfplay.iterations is {iterations} "
                    f"(iter0..iter{iterations - 1})") if rest else iterations - 1)
        return pipeline, {"iteration": t}
    if pipeline == "distill":
        if len(rest) > 1:
            raise ValueError(f"{ref!r}: give distill/stage<0|1|2> or distill")
        n = number(rest[0], "stage", range(3), "distillation has stage0 (the initialised student), "
                   "stage1 and stage2") if rest else 2
        return pipeline, {"stage": n}
    if pipeline == "router":
        if rest:
            raise ValueError(f"{ref!r}: the router builds one model; give router")
        return pipeline, {}
    if len(rest) != 2:
        raise ValueError(f"{ref!r}: give arena/stage<1|2|3>/<base>")
    stage = number(rest[0], "stage", range(1, 4), "the arena trains stage1, stage2 and stage3")
    if rest[1] not in section.get("bases", []):
        raise ValueError(f"{ref!r}: {rest[1]!r} is not one of arena.bases {section.get('bases')}")
    return pipeline, {"stage": stage, "base": rest[1]}


def model_uses(c: dict) -> list[tuple[str, str, str]]:
    """Every use of a model role by the sections present: ``(config key, role, how)``, how being
    ``serve`` (a vLLM pool generates with it; self-play also trains from it), ``causal_lm`` (training
    or teaching loads it with transformers' AutoModelForCausalLM) or ``classifier`` (the arena puts a
    score head on it)."""
    uses = []
    if "pseudo_labels" in c:
        uses.append(("pseudo_labels.teacher", c["pseudo_labels"]["teacher"], "serve"))
    if "selfplay" in c:
        uses.append(("selfplay.sft_model", c["selfplay"]["sft_model"], "serve"))
    if "arena" in c:
        uses += [(f"arena.bases[{i}]", b, "classifier") for i, b in enumerate(c["arena"]["bases"])]
        uses += [(f"arena.response_pairs.generators[{i}]", g, "serve")
                 for i, g in enumerate(c["arena"]["response_pairs"]["generators"])]
    if "router" in c:
        uses.append(("router.base", c["router"]["base"], "causal_lm"))
    if "distill" in c:
        uses.append(("distill.teacher", c["distill"]["teacher"], "causal_lm"))
    return uses


def built_by(c: dict, role: str) -> str | None:
    """The pipeline that builds model role ``role`` (models.<role>.built), None for an asset or a path."""
    m = c["models"].get(role)
    if not isinstance(m, dict) or "built" not in m:
        return None
    try:
        return parse_built(c, m["built"])[0]
    except ValueError:
        return None  # reported at the reference


_REFUSED = {
    ("hybrid", "serve"): "is the distilled RWKV-hybrid student, which vLLM cannot serve",
    ("hybrid", "causal_lm"): ("is the distilled RWKV-hybrid student, whose model code only distillation "
                              "loads (it is evaluated in distill/<name>/eval)"),
    ("hybrid", "classifier"): "is the distilled RWKV-hybrid student, which has no sequence-classification head",
    ("classifier", "serve"): "is an arena pairwise classifier (a score head, no LM head), which vLLM cannot serve",
    ("classifier", "causal_lm"): "is an arena pairwise classifier (a score head, no LM head), not a causal LM",
}


def _built_model_checks(c: dict) -> list[str]:
    """A built model must suit each use of its role, and no pipeline may need a model built from its
    own results (directly or through other pipelines)."""
    out = []
    for key, role, how in model_uses(c):
        m = c["models"].get(role)
        pipeline = built_by(c, role)
        if pipeline is None:
            continue
        why = _REFUSED.get((BUILT_KINDS[pipeline], how))
        if why:
            out.append(f"models.{role}.built: {m['built']!r} {why}; {key} names {role}. Name a self-play "
                       f"iteration, the router, an asset or a path there instead")
    # the pipelines' dependencies through built models (and distillation's on the pseudo-labels)
    needs: dict[str, list[tuple[str, str]]] = {}
    for key, role, _ in model_uses(c):
        pipeline = built_by(c, role)
        if pipeline is not None:
            needs.setdefault(key.split(".")[0], []).append((pipeline, f"{key} is models.{role}, built by {pipeline}"))
    if c.get("distill", {}).get("chat", {}).get("pseudo_labels") and "pseudo_labels" in c:
        needs.setdefault("distill", []).append(("pseudo_labels", "distill.chat.pseudo_labels trains on the pseudo-labels"))
    reported = set()
    for start in needs:
        path = _cycle_from(start, needs)
        if path and frozenset(p for p, _ in path) not in reported:
            reported.add(frozenset(p for p, _ in path))
            chain = "; ".join(why for _, why in path)
            out.append(f"models: the {path[0][0]} pipeline would need its own results ({chain}): "
                       "a model cannot be built from itself; name a model of another pipeline, an asset or a path")
    return out


def _cycle_from(start: str, needs: dict) -> list[tuple[str, str]] | None:
    """The first chain of (pipeline, why) edges from ``start`` back to ``start``, or None."""
    stack = [(start, [])]
    seen = set()
    while stack:
        node, path = stack.pop()
        for nxt, why in needs.get(node, []):
            step = path + [(node, why)]
            if nxt == start:
                return step
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, step))
    return None
