"""`snakemake --profile profiles/slurm` against a real single-node SLURM cluster.

The session fixture stands the cluster up with scripts/slurm_cluster.sh (Debian's slurm-wlm and
munge, two gres GPUs backed by placeholder devices) and stops the daemons it started afterwards.
It needs root, as in CI; elsewhere these tests are skipped with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

import pandas as pd
import pytest

from conftest import REPO, SNAKEMAKE, env, run_snakemake, write_config
from test_pseudo_labels_workflow import N_LINES, pl_config

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

SCRIPT = str(REPO / "scripts/slurm_cluster.sh")


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (apt, /etc/slurm, mknod)")
    already = subprocess.run(["bash", "-c", "command -v sinfo && sinfo -h"], capture_output=True).returncode == 0
    up = subprocess.run([SCRIPT, "up"], capture_output=True, text=True, timeout=900)
    assert up.returncode == 0, up.stdout + up.stderr
    yield
    if not already:
        subprocess.run([SCRIPT, "down"], timeout=120)


def slurm(workdir, *args, check=True):
    return run_snakemake(workdir, "--profile", str(REPO / "profiles/slurm"), *args, check=check, timeout=1800)


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def messages(path) -> dict[str, str]:
    df = pd.read_parquet(path)
    return {i: json.dumps([dict(x) for x in m], ensure_ascii=False) for i, m in zip(df["id"], df["messages"])}


def test_pipeline_through_slurm_matches_a_local_run(slurm_cluster, tmp_path):
    local, cluster = tmp_path / "local", tmp_path / "slurm"
    for wd in (local, cluster):
        write_config(wd, pl_config(wd))
    run_snakemake(local)
    out = slurm(cluster).stdout
    assert "submitted with SLURM jobid" in out
    model = "results/assets/models/tiny-llama/model.safetensors"
    assert sha(local / model) == sha(cluster / model)
    for name in ("chat_en", "chat_zh"):
        path = f"results/pseudo_labels/{name}/teacher/labels.parquet"
        a, b = messages(local / path), messages(cluster / path)
        assert len(a) == N_LINES and a == b
    assert list((cluster / "results/logs/slurm").rglob("*.log"))  # a log per SLURM job
    assert "Nothing to be done" in slurm(cluster, "-n").stdout


def run_snakefile(workdir, text: str, *args: str) -> subprocess.CompletedProcess:
    """Run a small test Snakefile through the slurm profile."""
    (workdir / "Snakefile").write_text(text)
    cmd = [SNAKEMAKE, "-s", str(workdir / "Snakefile"), "--directory", str(workdir),
           "--profile", str(REPO / "profiles/slurm"), *args]
    return subprocess.run(cmd, cwd=workdir, env=env(), capture_output=True, text=True, timeout=600)


GPU_SNAKEFILE = """
rule all:
    input: "gpu.txt", "cpu.txt"

rule on_gpu:
    output: "gpu.txt"
    resources: gpu=1
    shell: "echo CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES SLURM_JOB_PARTITION=$SLURM_JOB_PARTITION > {output}"

rule on_cpu:
    output: "cpu.txt"
    shell: "echo CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES:-unset}} SLURM_JOB_PARTITION=$SLURM_JOB_PARTITION > {output}"
"""


def test_gpu_resource_requests_gpus_and_the_job_sees_cuda_visible_devices(slurm_cluster, tmp_path):
    proc = run_snakefile(tmp_path, GPU_SNAKEFILE, "--set-resources", "on_gpu:slurm_partition=gpu")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "gpu.txt").read_text().split() == ["CUDA_VISIBLE_DEVICES=0", "SLURM_JOB_PARTITION=gpu"]
    assert (tmp_path / "cpu.txt").read_text().split() == ["CUDA_VISIBLE_DEVICES=unset", "SLURM_JOB_PARTITION=cpu"]


FLAKY_SNAKEFILE = """
rule flaky:
    output: "done.txt"
    shell:
        "if [ ! -e attempted ]; then touch attempted; echo injected fault >&2; exit 1; fi; "
        "echo ok > {output}"
"""


def test_a_job_that_fails_once_is_retried_and_the_run_completes(slurm_cluster, tmp_path):
    proc = run_snakefile(tmp_path, FLAKY_SNAKEFILE)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert (tmp_path / "done.txt").read_text() == "ok\n"
    assert out.count("submitted with SLURM jobid") == 2  # the failed attempt and its retry
