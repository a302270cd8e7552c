"""config.yaml: validation against schemas/config.schema.yaml plus the checks a schema cannot make.

Errors name the key path (``serve.max_model_len``), what was found and what is expected, and are
raised as :class:`ConfigError` before any job runs. Paths marked ``x-path`` in the schema must
exist (relative to the working directory).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelmake.errors import ConfigError

SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "config.schema.yaml"


def key_path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _with_defaults(schema: dict, value: Any, root: dict) -> Any:
    """Fill schema defaults into a config (objects only, recursively)."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return _with_defaults(root["$defs"][name], value, root)
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties", {})
        for k, sub in props.items():
            if k not in value and "default" in sub:
                value[k] = sub["default"]
        for k, v in value.items():
            sub = props.get(k, schema.get("additionalProperties"))
            if isinstance(sub, dict):
                value[k] = _with_defaults(sub, v, root)
    return value


def _paths(schema: dict, value: Any, root: dict, at: tuple = ()):
    """Yield (key path, path, kind) for every value the schema marks with x-path."""
    if "$ref" in schema:
        yield from _paths(root["$defs"][schema["$ref"].rsplit("/", 1)[-1]], value, root, at)
        return
    if "x-path" in schema and isinstance(value, str):
        yield at, value, schema["x-path"]
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for k, v in value.items():
            sub = props.get(k, schema.get("additionalProperties"))
            if isinstance(sub, dict):
                yield from _paths(sub, v, root, at + (k,))
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            yield from _paths(schema["items"], v, root, at + (i,))


def validate(config: dict, schema_path: str | Path = SCHEMA, check_paths: bool = True) -> dict:
    """Return the config with defaults filled in, or raise ConfigError listing every problem."""
    import jsonschema
    import yaml

    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    problems = []
    for err in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path))):
        where = key_path(err.absolute_path)
        if err.validator == "additionalProperties":
            allowed = ", ".join(sorted(err.schema.get("properties", {}))) or "see the schema"
            problems.append(f"{where}: {err.message}; allowed keys: {allowed}")
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
    config = _with_defaults(schema, config, schema)
    problems += _cross_checks(config)
    if check_paths:
        for at, p, kind in _paths(schema, config, schema):
            path = Path(p)
            if not (path.is_file() if kind == "file" else path.is_dir()):
                problems.append(f"{key_path(at)}: {kind} {p!r} does not exist (relative to {Path.cwd()})")
    if problems:
        raise ConfigError(_report(problems, schema_path))
    return config


def _report(problems: list[str], schema_path) -> str:
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"config.yaml does not match {schema_path}:\n{lines}\nFix these keys and run again."


def _cross_checks(c: dict) -> list[str]:
    """What JSON schema cannot say: references between sections."""
    out = []
    assets = c.get("assets", {})
    for name, m in c["models"].items():
        if "asset" in m and m["asset"] not in assets.get("models", {}):
            out.append(f"models.{name}.asset: {m['asset']!r} is not a key of assets.models")
    for i, d in enumerate(assets.get("tokenizer", {}).get("corpora", [])):
        if d not in c["datasets"]:
            out.append(f"assets.tokenizer.corpora[{i}]: {d!r} is not a key of datasets")
    if any("asset" in m for m in c["models"].values()) and "tokenizer" not in assets:
        out.append("assets.tokenizer: required when a model is built from assets")
    pl = c["pseudo_labels"]
    if pl["teacher"] not in c["models"]:
        out.append(f"pseudo_labels.teacher: {pl['teacher']!r} is not a key of models")
    for i, d in enumerate(pl["datasets"]):
        if d not in c["datasets"]:
            out.append(f"pseudo_labels.datasets[{i}]: {d!r} is not a key of datasets")
        elif pl["split"] not in c["datasets"][d]["splits"]:
            out.append(f"pseudo_labels.split: {pl['split']!r} is not a split of datasets.{d}")
    for i, p in enumerate(pl.get("build_partitions") or []):
        if p >= pl["partitions"]:
            out.append(f"pseudo_labels.build_partitions[{i}]: {p} is not below partitions={pl['partitions']}")
    if pl["max_conversation_tokens"] > c["serve"]["max_model_len"]:
        out.append(
            f"pseudo_labels.max_conversation_tokens: {pl['max_conversation_tokens']} exceeds "
            f"serve.max_model_len={c['serve']['max_model_len']}"
        )
    if "arena" in c:
        from modelmake.arena.checks import cross_checks

        out += cross_checks(c)
    out += _distill_checks(c) + _router_checks(c) + _selfplay_checks(c)
    return out


def _distill_checks(c: dict) -> list[str]:
    d = c.get("distill")
    if not d:
        return []
    out = []
    if d["teacher"] not in c["models"]:
        out.append(f"distill.teacher: {d['teacher']!r} is not a key of models")
    for i, name in enumerate(d["chat"]["datasets"]):
        if name not in c["datasets"]:
            out.append(f"distill.chat.datasets[{i}]: {name!r} is not a key of datasets")
        elif d["chat"]["split"] not in c["datasets"][name]["splits"]:
            out.append(f"distill.chat.split: {d['chat']['split']!r} is not a split of datasets.{name}")
    if not d["chat"]["datasets"] and not d["chat"].get("pseudo_labels"):
        out.append("distill.chat: name at least one dataset or set pseudo_labels: true")
    return out


def _router_checks(c: dict) -> list[str]:
    out = []
    r = c.get("router")
    if r is not None:
        if r["base"] not in c["models"]:
            out.append(f"router.base: {r['base']!r} is not a key of models")
        if r["split"]["calib"] + r["split"]["test"] >= 1:
            out.append("router.split: calib + test must leave records to train on (sum below 1)")
    return out


def _selfplay_checks(c: dict) -> list[str]:
    sp = c.get("selfplay")
    if not sp:
        return []
    out = []
    if sp["sft_model"] not in c["models"]:
        out.append(f"selfplay.sft_model: {sp['sft_model']!r} is not a key of models")
    if sp["dataset"] not in c["datasets"]:
        out.append(f"selfplay.dataset: {sp['dataset']!r} is not a key of datasets")
    else:
        for key in ("train_split", "test_split"):
            if sp[key] not in c["datasets"][sp["dataset"]]["splits"]:
                out.append(f"selfplay.{key}: {sp[key]!r} is not a split of datasets.{sp['dataset']}")
    if len(sp["per_iteration"]) > sp["iterations"]:
        out.append(f"selfplay.per_iteration: {len(sp['per_iteration'])} entries for {sp['iterations']} iterations")
    if sp["max_conversation_tokens"] > c["serve"]["max_model_len"]:
        out.append(f"selfplay.max_conversation_tokens: {sp['max_conversation_tokens']} exceeds "
                   f"serve.max_model_len={c['serve']['max_model_len']}")
    return out
