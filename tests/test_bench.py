"""Every script in bench/ runs end to end in its --smoke mode, so a benchmark cannot rot unnoticed.

Each test runs ``python bench/<script>.py --smoke`` as the README does, in a fresh working folder
(nothing from an earlier demo run's results/ is there), with a private TMPDIR so that every process
a benchmark starts names that folder on its command line. The test checks the ratio line is printed
and that no such process outlives the script (the script's own cleanup stops its vLLM pool or
training ranks); whatever is left, even after a failure or a timeout, is killed by PID.
The smoke numbers measure nothing: only the paths through the code are checked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import BIN, REPO, pid_alive


def processes_naming(folder: Path) -> list[int]:
    """Live processes (not this one) whose command line names ``folder``."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(folder) in cmdline and pid_alive(int(d.name)):
            found.append(int(d.name))
    return found


def kill_by_pid(pid: int) -> None:
    """SIGKILL a process, with its process group when it leads one (vLLM servers, supervisors, ranks)."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_bench(proc: subprocess.Popen) -> None:
    """A benchmark still running: SIGINT its process group (its own cleanup runs), SIGKILL after 60 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def run_smoke():
    """run_smoke(script, timeout) -> the script's output; asserts exit 0 and no process left behind."""
    started: list[tuple[subprocess.Popen, Path]] = []
    # short, under /tmp: vLLM's and Gloo's socket paths live in TMPDIR and have a length limit
    tmp = Path(tempfile.mkdtemp(prefix="mmb", dir="/tmp"))

    def run(script: str, timeout: float) -> str:
        env = {**os.environ, "TMPDIR": str(tmp), "PYTHONWARNINGS": "ignore",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
               "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        t = time.monotonic()
        proc = subprocess.Popen([sys.executable, str(REPO / "bench" / script), "--smoke"], cwd=tmp,
                                env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        started.append((proc, tmp))
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_bench(proc)
            out, _ = proc.communicate()
            raise AssertionError(f"{script} --smoke did not finish in {timeout} s:\n{out[-6000:]}") from None
        assert proc.returncode == 0, f"{script} --smoke exited with {proc.returncode}:\n{out[-6000:]}"
        left = processes_naming(tmp)
        assert not left, f"{script} left processes behind: {left}"
        print(f"{script} --smoke: {time.monotonic() - t:.1f} s\n{out[-3000:]}")
        return out

    yield run
    for proc, folder in started:
        stop_bench(proc)
        for pid in processes_naming(folder):
            kill_by_pid(pid)
    subprocess.run(["rm", "-rf", str(tmp)], check=False)


@pytest.mark.slow  # ~45 s: thirteen snakemake runs
def test_bench_dag_smoke_plans_and_prints_the_ratios(run_smoke):
    out = run_smoke("bench_dag.py", timeout=300)
    assert "ratio 10/2 shards: dry run x" in out, out
    assert "ratio modelmake / trivial Snakefile at 10 jobs: dry run x" in out
    assert "ratio modelmake / trivial Snakefile with generate_shard's declarations: dry run x" in out
    grouped = next(x for x in out.splitlines() if x.strip().startswith("modelmake, a job per partition"))
    assert grouped.split()[5:7] == ["10", "2"], grouped  # 10 shards in 2 jobs


@pytest.mark.slow  # ~2-3 min: three vLLM start-ups (the offline engine, then a pool of two servers behind Traefik)
def test_bench_serving_smoke_runs_every_client_and_prints_the_ratios(run_smoke):
    out = run_smoke("bench_serving.py", timeout=600)
    assert "ratio modelmake / vllm bench: " in out, out
    assert "ratio modelmake / offline: " in out
    for client in ("vllm bench (to the servers)", "modelmake (through Traefik)", "direct (to the servers)"):
        line = next((x for x in out.splitlines() if x.strip().startswith(client)), None)
        assert line is not None and line.endswith("failed 0"), f"{client}: {line}"


@pytest.mark.slow  # ~1 min: two trainings, each in its own process
def test_bench_router_smoke_trains_both_variants_and_prints_the_speedup(run_smoke):
    out = run_smoke("bench_router.py", timeout=400)
    assert "router SFT step on CPU: TRL defaults " in out
    assert "same final loss: True" in out


@pytest.mark.slow  # ~45 s: two distillation stages (in-process teacher, teacher service)
def test_bench_distill_smoke_runs_both_teachers_and_prints_the_ratio(run_smoke):
    out = run_smoke("bench_distill.py", timeout=400)
    assert "step rate, remote teacher service / in-process teacher: " in out
    assert "ranks per group 1: teacher " in out


@pytest.mark.slow  # ~2.5 min: a pseudo-label run (5-step teacher fit, 2 vLLM pools or more) rerun after chaos
def test_chaos_run_loses_duplicates_and_leaves_nothing(run_smoke):
    """A generation job, a vLLM server and the pool's supervisor SIGKILLed and results/ filled (a tmpfs)
    at seeded moments; rerun until done: no record lost or duplicated, no process left behind."""
    out = run_smoke("chaos.py", timeout=420)
    figures = json.loads(out.split("figures: ", 1)[1].splitlines()[0])
    assert figures["done"] and figures["reruns"] <= 6, out
    assert not figures["events_not_fired"], out
    assert (figures["lost"], figures["duplicated"], figures["orphans"]) == (0, 0, 0), out
    # mount -t tmpfs needs root and a container that allows mounts; where it cannot, the run says so
    if os.geteuid() == 0 and "fill_disk left out" not in out:
        assert figures["disk_full"], out


@pytest.mark.slow  # ~2 min: eight trainings (each pipeline and its plain loop), each in its own process
def test_bench_train_smoke_runs_every_pipeline_and_its_plain_loop(run_smoke):
    out = run_smoke("bench_train.py", timeout=600)
    for name in ("router", "arena", "selfplay", "distill"):
        line = next((x for x in out.splitlines() if x.startswith(f"{name} training step (")), None)
        assert line is not None, f"no line for {name}:\n{out}"
        assert ": ratio " in line and "losses of every step agree: True" in line, line
