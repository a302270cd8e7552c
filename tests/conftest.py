"""Shared fixtures: small workflow configs in temporary folders, and running real Snakemake."""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = str(BIN / "snakemake")


def demo_config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def _absolute(node):
    """Relative paths of files in the checkout (resources/..., config/...) made absolute."""
    if isinstance(node, dict):
        return {k: _absolute(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_absolute(v) for v in node]
    if isinstance(node, str) and "/" in node and not Path(node).is_absolute() and (REPO / node).exists():
        return str(REPO / node)
    return node


def small_config(workdir: Path, **overrides) -> dict:
    """The demo config with absolute resource paths, results under workdir, and overrides
    given as dotted keys: small_config(tmp, **{"serve.servers_per_partition": 1})."""
    c = _absolute(copy.deepcopy(demo_config()))
    c["results"] = str(workdir / "results")
    c["serve"]["idle_timeout_s"] = 15  # the demo's 60 s lets one pool serve its pipelines in turn; tests wait less
    for key, value in overrides.items():
        node = c
        *parents, last = key.split(".")
        for k in parents:
            node = node[k]
        node[last] = value
    return c


def write_config(workdir: Path, config: dict, name: str = "config.yaml") -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / name
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return path


def pytest_collection_modifyitems(config, items):
    """The SLURM cluster tests run last. Once Debian's slurm-client is installed (their session
    fixture installs it) and the cluster is down again, every Snakemake start waits ~10 s: the SLURM
    executor plugin runs `scontrol show config` when it is imported (its --help text), and scontrol
    retries the absent controller. Run last, that wait falls on no other test."""
    items.sort(key=lambda item: item.get_closest_marker("cluster") is not None)  # stable: order kept


def env() -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    return e


def snakemake_cmd(workdir: Path, *args: str, configfile: str = "config.yaml") -> list[str]:
    return [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / configfile), "--cores", "2", *args]


def run_snakemake(workdir: Path, *args: str, check: bool = True, timeout: float = 1200,
                  configfile: str = "config.yaml"):
    """Run Snakemake to completion; return the CompletedProcess (stdout and stderr merged)."""
    proc = subprocess.run(snakemake_cmd(workdir, *args, configfile=configfile), cwd=workdir, env=env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}")
    return proc


class Started:
    """A Snakemake run in the background, stopped (whole process group, by PID) on close."""

    def __init__(self, workdir: Path, *args: str, extra_env: dict[str, str] | None = None):
        self.log = open(workdir / "snakemake.out", "w")
        self.proc = subprocess.Popen(snakemake_cmd(workdir, *args), cwd=workdir, env={**env(), **(extra_env or {})},
                                     text=True, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = 1200) -> int:
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def wait_until(predicate, timeout: float, poll: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# --- demo assets, built once per test session

# Asset settings that workflow tests share (dotted keys for small_config), so that the session builds
# them once: the demo's models fitted briefly, enough to answer in-domain without having memorised
# the demo answers (self-play samples its own answers from tiny-llama). Used by the self-play, SLURM
# and pseudo-label tests (the last fit on their own 60-line corpora: a build of their own). The arena
# test fits its bases longer (a classifier learns nothing from 30-step bases), so it seeds its own
# build; any test with other asset settings gets its own build, once per session.
WORKFLOW_ASSETS = {"assets.models.tiny-llama.steps": 50, "assets.models.tiny-llama-b.steps": 30}


class DemoAssets:
    """The demo's tokenizer and tiny models, with the reformatted corpora they are fitted on, built by
    the real rules (reformat, build_tokenizer, build_model) once per test session and asset config,
    then seeded into each workflow folder that needs them, where Snakemake finds them up to date.
    """

    def __init__(self, root: Path):
        self.root = root

    def seed(self, workdir: Path, config: dict, models: list[str] | None = None) -> None:
        """Give workdir, whose config.yaml is ``config``, the tokenizer, ``models`` (default: the assets
        its model roles name) and their corpora, as its own Snakemake run would have left them."""
        if models is None:
            models = [m["asset"] for m in config["models"].values() if "asset" in m]
        models = sorted(set(models))
        folder = self._build(workdir, config, models)
        src, dst = folder / "results", Path(config["results"])
        parts = ["assets/tokenizer", "logs/assets/tokenizer.log"]
        for d in config["assets"]["tokenizer"]["corpora"]:
            parts += [f"data/{d}/reformatted", f"logs/reformat/{d}", f"benchmarks/reformat/{d}"]
        for m in models:
            parts += [f"assets/models/{m}", f"logs/assets/model_{m}.log", f"benchmarks/assets/model_{m}.tsv"]
        for part in parts:
            if (src / part).is_dir():
                shutil.copytree(src / part, dst / part, dirs_exist_ok=True)
            elif (src / part).exists():
                (dst / part).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / part, dst / part)
        # Snakemake's bookkeeping of this folder: the jobs' metadata (params, input set, code) recorded
        # against its own config, and mtimes in rule order, newer than the raw files. Nothing is built.
        run_snakemake(workdir, "--touch", "--forcerun", "reformat", "build_tokenizer", "build_model",
                      "--", *_asset_targets(config, models))

    def _build(self, workdir: Path, config: dict, models: list[str]) -> Path:
        """The session folder of this asset config, with ``models`` built (by the rules, once)."""
        folder = self.root / _asset_key(workdir, config)
        session_config = folder / "config.yaml"
        if not session_config.exists():
            c = copy.deepcopy(config)
            c["results"] = str(folder / "results")
            for d in c["assets"]["tokenizer"]["corpora"]:  # raw files from inside workdir come along
                splits = c["datasets"][d]["splits"]
                for split, paths in splits.items():
                    splits[split] = [_relocate(Path(p), workdir, folder) for p in paths]
            write_config(folder, c)
        targets = _asset_targets(yaml.safe_load(session_config.read_text()), models)
        if not all(Path(t).exists() for t in targets):
            run_snakemake(folder, *targets)
        return folder


def _asset_key(workdir: Path, config: dict) -> str:
    """What the assets are made of: their settings, the seed and the raw corpora (where and what)."""
    def raw(path: str) -> list[str]:
        p = Path(path)
        return [str(p.relative_to(workdir) if p.is_relative_to(workdir) else p),
                hashlib.sha256(p.read_bytes()).hexdigest()]

    corpora = config["assets"]["tokenizer"]["corpora"]
    spec = {"assets": config["assets"], "seed": config["seed"], "reformat": config["reformat"],
            "raw": {d: {s: [raw(p) for p in paths] for s, paths in config["datasets"][d]["splits"].items()}
                    for d in corpora}}
    return hashlib.sha256(yaml.safe_dump(spec, sort_keys=True).encode()).hexdigest()[:16]


def _relocate(path: Path, workdir: Path, folder: Path) -> str:
    if not path.is_relative_to(workdir):
        return str(path)
    to = folder / path.relative_to(workdir)
    to.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, to)
    return str(to)


def _asset_targets(config: dict, models: list[str]) -> list[str]:
    assets = Path(config["results"]) / "assets"
    return [str(assets / "tokenizer"), *(str(assets / "models" / m) for m in models)]


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory) -> DemoAssets:
    """The demo assets, built once per session and asset config: ``demo_assets.seed(workdir, config)``."""
    return DemoAssets(tmp_path_factory.mktemp("demo_assets"))
