"""The GPU check (bench/gpu_check.sh, bench/gpu_check.py) cannot rot: its --cpu mode runs every
pipeline's check here, and the parts that only run on a GPU are exercised on the CPU where they can
be (the fla comparison through a stand-in kernel, the GPU scale settings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import BIN, REPO
from test_bench import kill_by_pid, processes_naming, stop_bench

sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402


@pytest.mark.slow  # ~3 min on 2 cores (+ ~5 min once per machine: DeepSpeed compiles its CPU ops)
def test_cpu_mode_runs_every_pipelines_check_and_sums_them_up():
    tmp = Path(tempfile.mkdtemp(prefix="mmg", dir="/tmp"))  # short: Gloo's socket paths live in TMPDIR
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONWARNINGS": "ignore",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = ["bash", str(REPO / "bench/gpu_check.sh"), "--no-venv", "--python", sys.executable, "--cpu",
           "--work", str(tmp / "work"), "--report", str(tmp / "report")]
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=1200)
        assert proc.returncode == 0, out[-6000:]
        assert not processes_naming(tmp), "the check left processes behind"
        summary = json.loads((tmp / "report/summary.json").read_text())
        reported = {p.name for p in (tmp / "report").iterdir()}
    finally:
        stop_bench(proc)
        for pid in processes_naming(tmp):
            kill_by_pid(pid)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    table = out[out.index("\nsummary (cpu"):]
    print(table)
    rows = {line.split()[0]: line.split()[1] for line in table.splitlines()[2:] if line.split()
            and line.split()[0] in gpu_check.CHECKS}
    assert rows == {"router": "ok", "arena": "ok", "selfplay": "ok", "distill": "ok", "fla": "skip"}, table
    assert "5 of 5 checks passed or skipped" in table
    assert "fla       skip" in table and "Triton kernels need a GPU" in table
    for name in ("router", "arena", "selfplay", "distill"):
        r = summary["checks"][name]
        assert r["steps"] >= 2 and r["seconds"] > 0 and r["peak_bytes"] > 0, (name, r)
    assert "ZeRO-3 checkpoint consolidated" in summary["checks"]["router"]["note"]
    assert "DeepSpeed zero3_cpu.json" in summary["checks"]["distill"]["note"]
    assert reported == {"summary.json", "prepare.log", *(f"{n}.log" for n in gpu_check.CHECKS)}


def test_on_a_gpu_each_pipeline_runs_its_cluster_scale_in_bf16_and_on_the_cpu_its_cpu_configs():
    for pipeline in ("router", "arena", "selfplay", "distill"):
        gpu, cpu = gpu_check.cluster_scale(pipeline, True), gpu_check.cluster_scale(pipeline, False)
        assert (gpu["gpu"], gpu["precision"], gpu["processes"], gpu["nodes"]) == (True, "bf16", 1, 1)
        assert (cpu["gpu"], cpu["precision"]) == (False, "fp32")
        for scale in (gpu, cpu):
            assert not scale.get("deepspeed") or Path(scale["deepspeed"]).is_file()
    assert Path(gpu_check.cluster_scale("router", True)["deepspeed"]).name == "zero3_offload.json"
    assert Path(gpu_check.cluster_scale("distill", True)["deepspeed"]).name == "zero3_offload.json"
    assert Path(gpu_check.cluster_scale("distill", False)["deepspeed"]).name == "zero3_cpu.json"


def test_the_fla_comparison_passes_a_faithful_kernel_and_fails_a_swapped_layout(monkeypatch):
    """The GPU-only comparison, on the CPU: through the stand-in for fla's kernel that
    tests/test_distill.py checks against fla's documented contract it passes; with keys and values
    swapped in the call it fails, naming what differs."""
    import torch

    from modelmake.distill import hybrid
    from test_distill import fake_chunk_rwkv6

    monkeypatch.setattr(hybrid, "chunk_rwkv6", fake_chunk_rwkv6)
    got = gpu_check.fla_equivalence(torch.device("cpu"), batch=2, heads=3, length=20, head_dim=8)
    assert "fp32 rel. error y 0.0e+00" in got["note"] and got["steps"] == 20

    faithful = hybrid.fla_rwkv6
    monkeypatch.setattr(hybrid, "fla_rwkv6", lambda r, k, v, logw, u: faithful(r, v, k, logw, u))
    with pytest.raises(RuntimeError, match="fla differs from the recurrence beyond tolerance: {'y': "):
        gpu_check.fla_equivalence(torch.device("cpu"), batch=2, heads=3, length=20, head_dim=8)
