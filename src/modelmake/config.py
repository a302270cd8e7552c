"""config.yaml: validation against schemas/config.schema.yaml plus the checks a schema cannot make.

Errors name the key path (``serve.max_model_len``), what was found and what is expected, and are
raised as :class:`ConfigError` before any job runs. Paths marked ``x-path`` in the schema must
exist (relative to the working directory); ``x-path: source`` values, users' records, must be
sources :mod:`modelmake.records` reads (a hub id is not checked: that needs the hub).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
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


@functools.cache
def schema() -> dict:
    """schemas/config.schema.yaml, read once. The one source of every setting's default: the library
    asks :func:`default`, :func:`defaults` and :func:`fill_defaults` instead of keeping values of its own."""
    import yaml

    return yaml.load(SCHEMA.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


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


def validate(config: dict, schema_path: str | Path = SCHEMA, check_paths: bool = True) -> dict:
    """Return the config with defaults filled in, or raise ConfigError listing every problem."""
    import jsonschema
    import yaml

    schema = yaml.safe_load(Path(schema_path).read_text())
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
        elif err.validator in ("oneOf", "anyOf") and err.context:
            # say what each alternative expected, not just that none matched
            why = "; ".join(dict.fromkeys(e.message for e in err.context))
            problems.append(f"{where}: {err.instance!r} matches none of the allowed forms ({why})")
        else:
            problems.append(f"{where}: {err.message}")
    if problems:
        raise ConfigError(_report(problems, schema_path))
    problems += _map_old_scale_keys(config)
    if problems:
        raise ConfigError(_report(problems, schema_path))
    config = _with_defaults(schema, config, schema)
    for at, value, ref, parent in _annotated(schema, config, schema, "x-ref"):
        problems += _ref_problems(config, at, value, ref, parent)
    for at, _, source, _ in _annotated(schema, config, schema, "x-from", types=(object,)):
        problems.append(f"{key_path(at)}: set by {source}; remove it here")
    problems += _cross_checks(config)
    if check_paths:
        from modelmake.records import source_problem

        for at, p, kind, _ in _annotated(schema, config, schema, "x-path"):
            if kind == "source":  # users' records: a file of a known format, a datasets folder, a hub id
                problem = source_problem(p)
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
    out += _distill_checks(c) + _router_checks(c) + _selfplay_checks(c) + _scale_checks(c)
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


def _router_checks(c: dict) -> list[str]:
    r = c.get("router")
    if r is not None and r["split"]["calib"] + r["split"]["test"] >= 1:
        return ["router.split: calib + test must leave records to train on (sum below 1)"]
    return []


def _selfplay_checks(c: dict) -> list[str]:
    sp = c.get("selfplay")
    if sp and len(sp["per_iteration"]) > sp["iterations"]:
        return [f"selfplay.per_iteration: {len(sp['per_iteration'])} entries for {sp['iterations']} iterations"]
    return []
