"""`snakemake --profile profiles/slurm` against a real single-node SLURM cluster.

The session fixture stands the cluster up with scripts/slurm_cluster.sh (Debian's slurm-wlm and
munge, two gres GPUs backed by placeholder devices) and stops the daemons it started afterwards.
It needs root, as in CI; elsewhere these tests are skipped with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess

import pandas as pd
import pytest

from conftest import REPO, SNAKEMAKE, Started, env, run_snakemake, wait_until, write_config
from test_pseudo_labels_workflow import N_LINES, assert_no_pool_process_left, ids, pl_config

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

SCRIPT = str(REPO / "scripts/slurm_cluster.sh")
# The plugin's first status check comes 40 s after a submission and the next ones 10 s later each
# time nothing finished: right for a real cluster, minutes of waiting for these seconds-long jobs.
POLL = ("--slurm-init-seconds-before-status-checks", "1")


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
    return run_snakemake(workdir, "--profile", str(REPO / "profiles/slurm"), *POLL, *args, check=check,
                         timeout=1800)


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def messages(path) -> dict[str, str]:
    df = pd.read_parquet(path)
    return {i: json.dumps([dict(x) for x in m], ensure_ascii=False) for i, m in zip(df["id"], df["messages"])}


@pytest.fixture(scope="module")
def local_and_slurm(slurm_cluster, tmp_path_factory, demo_assets):
    """The demo pipeline (small) run locally and through the slurm profile, in two folders."""
    local, cluster = tmp_path_factory.mktemp("local"), tmp_path_factory.mktemp("slurm")
    configs = {wd: pl_config(wd) for wd in (local, cluster)}
    for wd, cfg in configs.items():
        write_config(wd, cfg)
    # the local run takes the session's local build of these assets; the slurm run builds its own
    demo_assets.seed(local, configs[local])
    run_snakemake(local)
    out = slurm(cluster).stdout
    return local, cluster, out


def test_pipeline_through_slurm_matches_a_local_run(local_and_slurm):
    local, cluster, out = local_and_slurm
    assert "submitted with SLURM jobid" in out
    model = "results/assets/models/tiny-llama/model.safetensors"
    assert sha(local / model) == sha(cluster / model)
    for name in ("chat_en", "chat_zh"):
        path = f"results/pseudo_labels/{name}/teacher/labels.parquet"
        a, b = messages(local / path), messages(cluster / path)
        assert len(a) == N_LINES and a == b
    assert list((cluster / "results/logs/slurm").rglob("*.log"))  # a log per SLURM job
    assert "Nothing to be done" in slurm(cluster, "-n").stdout


def test_a_partition_runs_as_one_allocation(local_and_slurm):
    """Every generation job of partition 0 (both datasets, two shards each) shares one SLURM job."""
    _, cluster, out = local_and_slurm
    groups = re.findall(r"SLURM jobid (\d+) \(log: [^)]*/group_pl_part0_generate_shard/", out)
    assert len(groups) == 1, out[-3000:]
    generate_logs = list((cluster / "results/logs/generate").rglob("shard*.log"))
    assert len(generate_logs) == 4
    started = [p for p in generate_logs if "started a serving pool" in p.read_text()]
    assert len(started) == 1  # the first member started the pool; the other three joined it


def test_scancel_mid_run_then_rerun_loses_and_duplicates_nothing(local_and_slurm, tmp_path):
    _, cluster, _ = local_and_slurm
    cfg = pl_config(tmp_path, **{"pseudo_labels.concurrency": 2})
    cfg["models"]["teacher"] = {"path": str(cluster / "results/assets/models/tiny-llama")}
    write_config(tmp_path, cfg)
    journal = tmp_path / "results/pseudo_labels/chat_en/teacher/part0/.journal/shard0.jsonl"
    run = Started(tmp_path, "--profile", str(REPO / "profiles/slurm"), *POLL, "--retries", "0")
    try:
        wait_until(lambda: journal.exists() and len(journal.read_text().splitlines()) >= 5, 900,
                   what="the first generated records")
        out = (tmp_path / "snakemake.out").read_text()
        job = re.findall(r"SLURM jobid (\d+) \(log: [^)]*/group_pl_part0_generate_shard/", out)
        assert len(job) == 1, out[-3000:]
        subprocess.run(["scancel", job[0]], check=True)
        rc = run.wait(timeout=600)
        at_cancel = len(journal.read_text().splitlines())
    finally:
        run.close()
    assert rc != 0
    assert_no_pool_process_left(tmp_path)
    slurm(tmp_path)
    for name in ("chat_en", "chat_zh"):
        got = [i for p in sorted((tmp_path / f"results/pseudo_labels/{name}/teacher/part0").glob("shard*.jsonl"))
               for i in ids(p)]
        want = [i for p in sorted((tmp_path / f"results/data/{name}/shards/train/part0").glob("shard*.jsonl"))
                for i in ids(p)]
        assert got == want and len(set(got)) == N_LINES  # nothing lost, nothing duplicated
    log = (tmp_path / "results/logs/generate/chat_en/teacher/part0/shard0.log").read_text()
    reused = int(re.search(r"(\d+) reused from the journal", log)[1])
    assert reused >= at_cancel - 1  # the cancelled job's finished records were not generated again


def run_snakefile(workdir, text: str, *args: str) -> subprocess.CompletedProcess:
    """Run a small test Snakefile through the slurm profile."""
    (workdir / "Snakefile").write_text(text)
    cmd = [SNAKEMAKE, "-s", str(workdir / "Snakefile"), "--directory", str(workdir),
           "--profile", str(REPO / "profiles/slurm"), *POLL, *args]
    return subprocess.run(cmd, cwd=workdir, env=env(), capture_output=True, text=True, timeout=600)


# One small workflow (one SLURM run) for the resource and retry promises: SLURM's fixed costs
# (submission, polling) dominate such runs.
SMALL_SNAKEFILE = """
rule all:
    input: "gpu.txt", "cpu.txt", "done.txt"

rule on_gpu:
    output: "gpu.txt"
    resources: gpu=1
    shell: "echo CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES SLURM_JOB_PARTITION=$SLURM_JOB_PARTITION > {output}"

rule on_cpu:
    output: "cpu.txt"
    shell: "echo CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES:-unset}} SLURM_JOB_PARTITION=$SLURM_JOB_PARTITION > {output}"

rule flaky:
    output: "done.txt"
    shell:
        "if [ ! -e attempted ]; then touch attempted; echo injected fault >&2; exit 1; fi; "
        "echo ok > {output}"
"""


@pytest.fixture(scope="module")
def small_run(slurm_cluster, tmp_path_factory):
    wd = tmp_path_factory.mktemp("small")
    proc = run_snakefile(wd, SMALL_SNAKEFILE, "--set-resources", "on_gpu:slurm_partition=gpu")
    return wd, proc.returncode, proc.stdout + proc.stderr


def test_gpu_resource_requests_gpus_and_the_job_sees_cuda_visible_devices(small_run):
    wd, rc, out = small_run
    assert rc == 0, out[-3000:]
    assert (wd / "gpu.txt").read_text().split() == ["CUDA_VISIBLE_DEVICES=0", "SLURM_JOB_PARTITION=gpu"]
    assert (wd / "cpu.txt").read_text().split() == ["CUDA_VISIBLE_DEVICES=unset", "SLURM_JOB_PARTITION=cpu"]


def test_a_job_that_fails_once_is_retried_and_the_run_completes(small_run):
    wd, rc, out = small_run
    assert rc == 0, out[-3000:]
    assert (wd / "done.txt").read_text() == "ok\n"
    flaky = re.findall(r"SLURM jobid \d+ \(log: [^)]*/rule_flaky/", out)
    assert len(flaky) == 2  # the failed attempt and its retry
