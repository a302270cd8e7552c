"""Shared fixtures: small workflow configs in temporary folders, and running real Snakemake."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
