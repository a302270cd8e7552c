"""What the benchmarks share: a measurement in a process of its own and how it hands its result back,
the CPU time of processes, and the closing line of a smoke run.

A measured side runs in a fresh process (``child``, or ``start`` + ``result`` for several at once),
so that neither side inherits the other's warm caches, threads or allocations; it prints one
``BENCH_RESULT {json}`` line (``emit``), which the parent reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT = "BENCH_RESULT "
SMOKE_NOTE = "smoke run: every code path ran; these numbers are not a benchmark"


def emit(result: dict) -> None:
    """Hand ``result`` to the parent (the last BENCH_RESULT line of stdout counts)."""
    print(RESULT + json.dumps(result), flush=True)


def start(cmd: list[str], threads: int | None = None, env: dict | None = None,
          log: Path | None = None) -> subprocess.Popen:
    """Start ``cmd`` (a measured side); ``threads``: its OMP_NUM_THREADS (torch's intra-op threads);
    ``log``: where its output goes (else a pipe: fine for one child at a time, which ``result`` drains)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
           **({"OMP_NUM_THREADS": str(threads)} if threads else {}), **(env or {})}
    if log is None:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def result(proc: subprocess.Popen, what: str) -> dict:
    """Wait for ``proc`` and return what it emitted; exit naming ``what`` and its output's tail when
    it failed or emitted nothing."""
    if getattr(proc, "log", None):
        proc.wait()
        out, err = Path(proc.log).read_text(errors="replace"), ""
    else:
        out, err = proc.communicate()
    line = next((x for x in reversed(out.splitlines()) if x.startswith(RESULT)), None)
    if proc.returncode or line is None:
        sys.exit(f"{what} failed (exit {proc.returncode}):\n{out[-2000:]}\n{err[-4000:]}")
    return json.loads(line[len(RESULT):])


def child(cmd: list[str], what: str, threads: int | None = None, env: dict | None = None) -> dict:
    """Run ``cmd`` to its end and return what it emitted (see ``result``)."""
    return result(start(cmd, threads, env), what)


def cpu_seconds(pgids: set[int]) -> float:
    """User + system CPU seconds of the live processes in the process groups ``pgids`` (a vLLM
    server and its engine process, the proxy), from /proc; a process that has exited is not counted."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) in pgids:  # fields[0] is the state (field 3 of proc(5)); pgrp is field 5
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / tick


def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (every thread)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
