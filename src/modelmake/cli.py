"""``python -m modelmake <command>``: the thin entry points the rules call.

Argument wiring only; the work happens in the library modules. A :class:`UserError` is printed as
``modelmake: <message>`` with exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

from modelmake.errors import UserError

PIPELINES = ("pseudo_labels", "router", "selfplay", "arena", "distill")


def cmd_check_config(a) -> None:
    import yaml

    from modelmake.config import validate

    validate(yaml.safe_load(Path(a.config).read_text()))
    print(f"{a.config}: ok")


def cmd_trace(a) -> None:
    from modelmake.files import format_trace, trace

    if not Path(a.artifact).exists():
        raise UserError(f"{a.artifact}: no such file or folder (give an artifact's path, e.g. under results/)")
    tree = trace(a.artifact, root=a.root, max_depth=a.depth)
    print(json.dumps(tree, indent=2, ensure_ascii=False, default=str) if a.json else format_trace(tree))


def cmd_reformat(a) -> None:
    from modelmake.reformat import reformat_files

    s = reformat_files(a.inputs, a.out, on_error=a.on_error, rejects=a.rejects, stats_path=a.stats,
                       fields=json.loads(a.fields), allow_empty=a.allow_empty, config_key=a.config_key)
    logging.info("reformat: read %d, wrote %d, rejected %d %s", s.read, s.written, s.rejected, s.reasons or "")


def cmd_build_tokenizer(a) -> None:
    from modelmake.assets import build_tokenizer

    build_tokenizer(a.corpora, a.out, a.vocab_size)


def cmd_build_model(a) -> None:
    from modelmake.assets import build_tiny_llama

    build_tiny_llama(a.tokenizer, a.corpora, a.out, seed=a.seed, **json.loads(a.arch))


def cmd_serve(a) -> None:
    from modelmake.serve import PoolSpec, run_pool

    spec = PoolSpec(**json.loads(a.spec))
    sys.exit(run_pool(spec, a.folder, a.log_dir, a.ready_timeout, a.idle_timeout))


def cmd_generate(a) -> None:
    import socket

    from modelmake.config import default
    from modelmake.generate import GenerateSettings, generate_files, served_model_source
    from modelmake.serve import PoolSpec, lease

    pool = json.loads(a.pool)
    spec = PoolSpec(**pool["spec"])
    opts = json.loads(a.settings)
    opts["teacher_source"] = served_model_source(opts.get("teacher_source"), spec.model)
    # a pool's processes are local: a folder per host, and under SLURM per allocation (another job's
    # pool on the same node holds that job's GPUs and ends with it)
    host = socket.gethostname() + (f"/slurm-{os.environ['SLURM_JOB_ID']}" if os.environ.get("SLURM_JOB_ID") else "")
    ready = pool.get("ready_timeout_s", default("serve.ready_timeout_s"))
    idle = pool.get("idle_timeout_s", default("serve.idle_timeout_s"))

    @contextlib.contextmanager
    def server():
        with lease(spec, Path(pool["folder"]) / host, Path(pool["logs"]) / host,
                   ready_timeout_s=ready, idle_s=idle) as proxy:
            yield proxy  # its url and api_key

    settings = GenerateSettings.from_dict(pool.get("label", spec.served_name), {**opts, "served_name": spec.served_name})
    generate_files(a.records, a.out, server, settings, spec.model)


def parser() -> argparse.ArgumentParser:
    from modelmake.config import default

    ap = argparse.ArgumentParser(prog="modelmake", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check-config", help="validate a config file against the schema")
    p.add_argument("config")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("trace", help="where an artifact came from: its provenance's inputs, back across pipelines")
    p.add_argument("artifact", help="a file or folder the workflow wrote")
    p.add_argument("--root", default=None, help="the folder the recorded paths are relative to (default: here)")
    p.add_argument("--depth", type=int, default=64, help="follow inputs this many levels back")
    p.add_argument("--json", action="store_true", help="the whole tree with every record, as JSON")
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("reformat", help="raw chat records (any format modelmake reads) -> {id, messages} parquet")
    p.add_argument("inputs", nargs="+", help="files, datasets folders or hf:// ids (modelmake.records)")
    p.add_argument("--out", required=True)
    p.add_argument("--on-error", choices=["fail", "skip"], default=default("reformat.on_error"))
    p.add_argument("--rejects")
    p.add_argument("--stats")
    p.add_argument("--fields", default="{}", help="JSON {canonical name: name in the source} (datasets.<name>.fields)")
    p.add_argument("--allow-empty", action="store_true", help="write an empty split instead of failing")
    p.add_argument("--config-key", help="the dataset's config key, for errors (datasets.<name>)")
    p.set_defaults(func=cmd_reformat)

    p = sub.add_parser("build-tokenizer", help="train the demo BPE tokenizer")
    p.add_argument("corpora", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, required=True)
    p.set_defaults(func=cmd_build_tokenizer)

    p = sub.add_parser("build-model", help="build and briefly fit a tiny Llama")
    p.add_argument("corpora", nargs="+")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--arch", required=True, help="JSON of the architecture and fit settings")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_build_model)

    p = sub.add_parser("serve", help="supervise vLLM servers behind a Traefik proxy while leased")
    p.add_argument("--folder", required=True, help="the pool folder (lock, leases, readiness files)")
    p.add_argument("--log-dir", required=True)
    p.add_argument("--spec", required=True, help="JSON of modelmake.serve.PoolSpec")
    p.add_argument("--ready-timeout", type=float, default=default("serve.ready_timeout_s"))
    p.add_argument("--idle-timeout", type=float, default=default("serve.idle_timeout_s"),
                   help="stop after this long without a lease")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("generate", help="generate the assistant turns of jsonl files of conversations")
    p.add_argument("records", nargs="+", help="jsonl files of conversations, generated one after another")
    p.add_argument("--out", required=True,
                   help="the output file (*.jsonl) of the one records file, or a folder (any other name) "
                        "that receives a file per records file, named as it")
    p.add_argument("--settings", required=True,
                   help="JSON of GenerateSettings less the model; config_key: the caller's config section")
    p.add_argument("--pool", required=True,
                   help="JSON of the pool to lease: spec (modelmake.serve.PoolSpec), folder and logs (a "
                        "subfolder of each per host), ready_timeout_s, idle_timeout_s")
    p.set_defaults(func=cmd_generate)

    # Each pipeline package adds its own subcommands (modelmake.<pipeline>.cli.add_commands), so
    # pipelines never edit this file; their modules import torch and friends lazily, in the commands.
    for name in PIPELINES:
        if importlib.util.find_spec(f"modelmake.{name}") and importlib.util.find_spec(f"modelmake.{name}.cli"):
            importlib.import_module(f"modelmake.{name}.cli").add_commands(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    from modelmake.launch import die_with_launcher

    die_with_launcher()  # a worker of torchrun dies with it
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the progress bar
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"modelmake: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
