"""Benchmark: Snakemake's planning time at scale (10,000 pseudo-label shards).

Measures, in one run and on this machine, wall and CPU seconds of:
  * ``snakemake -n`` on a config with partitions x shards_per_partition = 10,000 shards, nothing built,
    with a generation job per shard (``pseudo_labels.shards_per_job: 1``, the default);
  * ``snakemake -n`` when every output exists (a no-op rerun: "Nothing to be done");
  * the same two for 100 shards, so the ratios show how planning scales;
  * the same two with a job per partition (``shards_per_job: partition``: 10 jobs, each writing its
    partition's 1,000 shard files into one folder);
  * the same two for a trivial Snakefile with a job per shard (one input folder, one output and a log
    per job: Snakemake's own floor on this machine), so the ratio shows modelmake's overhead;
  * and for a trivial Snakefile whose jobs declare what a generation job declares (its resources,
    params, conda environment, shell fields and wildcards), so that the gap splits into Snakemake's
    cost of those declarations and modelmake's own (config, input functions, path helpers).
The outputs of the no-op cases are placeholders written by this script (nothing is generated); the
reformat and shard steps run for real.

snakemake-executor-plugin-slurm runs ``scontrol show config`` (a 10 s timeout) whenever Snakemake loads
its plugins: with SLURM's client installed and no controller answering, every Snakemake start waits
10 s. That is no planning, so Snakemake runs here with a ``scontrol`` that fails at once (said in the
output).

Usage: python bench/bench_dag.py [--partitions 10] [--shards 1000] [--smoke]
--smoke: 2 partitions x 5 shards against a base of 1 x 2 (the same code paths in seconds; the test
suite runs it so the script cannot rot; its numbers are not benchmarks).
Targets (issue 17): a job per shard within 1.1x of the trivial Snakefile; a job per partition plans
10,000 shards in < 5 s and reruns a no-op in < 3 s (2 cores).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

import common

REPO = common.REPO
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def make_workdir(root: Path, partitions: int, shards: int, shards_per_job: int | str = 1) -> Path:
    wd = root / f"p{partitions}x{shards}_j{shards_per_job}"
    (wd / "model").mkdir(parents=True)  # a placeholder model folder: a dry run only reads its config.json
    (wd / "model" / "config.json").write_text("{}\n")
    demo = yaml.safe_load((REPO / "config.yaml").read_text())
    # A --configfile is the whole config and a pipeline is built iff its section is present: keep
    # only what the benchmark measures, the pseudo-label pipeline on chat_en, with a placeholder
    # teacher folder (no assets section: nothing is built but the data steps).
    cfg = {key: copy.deepcopy(demo[key]) for key in ("seed", "reformat", "serve", "pseudo_labels")}
    cfg["results"] = str(wd / "results")
    cfg["models"] = {"teacher": {"path": str(wd / "model")}}
    cfg["datasets"] = {"chat_en": {"splits": {k: [str(REPO / f) for f in v]
                                              for k, v in demo["datasets"]["chat_en"]["splits"].items()}}}
    cfg["pseudo_labels"].update(partitions=partitions, shards_per_partition=shards, datasets=["chat_en"],
                                shards_per_job=shards_per_job)
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    return wd


def scontrol_stub(root: Path) -> Path:
    """A folder whose ``scontrol`` fails at once, to put first on the PATH (see the module docstring)."""
    d = root / "bin"
    d.mkdir(exist_ok=True)
    (d / "scontrol").write_text("#!/bin/sh\nexit 1\n")
    (d / "scontrol").chmod(0o755)
    return d


def timed(cmd: list[str], wd: Path, what: str) -> tuple[float, float, str]:
    """Run ``cmd`` in ``wd``: wall seconds, CPU seconds (user + system, its children included), output."""
    path = [str(STUB)] if STUB else []
    env = {**os.environ, "PATH": os.pathsep.join([*path, str(Path(sys.executable).parent), os.environ["PATH"]])}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=wd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"{what} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return dt, cpu, p.stdout + p.stderr


def snakemake(wd: Path, *args: str) -> tuple[float, float, str]:
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(wd), "--configfile",
           str(wd / "config.yaml"), "--cores", "2", *args, "--quiet", "all"]
    return timed(cmd, wd, f"snakemake {' '.join(args)}")


def fill_outputs(wd: Path, partitions: int, shards: int, shards_per_job: int | str) -> None:
    """Build the real data steps, then place pseudo-label outputs so that nothing is left to do."""
    targets = [str(wd / f"results/data/chat_en/shards/train/part{p}") for p in range(partitions)]
    snakemake(wd, *targets)
    time.sleep(1.1)  # outputs must be newer than the shards at mtime resolution
    per_job = shards if shards_per_job == "partition" else shards_per_job
    base = wd / "results/pseudo_labels/chat_en/teacher"
    for p in range(partitions):
        for s in range(shards):
            f = base / f"part{p}" / (f"group{s // per_job}/" if per_job != 1 else "") / f"shard{s}.jsonl"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.touch()
    time.sleep(0.05)
    for name in ("labels.parquet", "stats.json", "lengths.png"):
        (base / name).touch()


def measure(root: Path, partitions: int, shards: int, shards_per_job: int | str = 1) -> dict:
    wd = make_workdir(root, partitions, shards, shards_per_job)
    dry, dry_cpu, _ = snakemake(wd, "-n")
    per_job = shards if shards_per_job == "partition" else shards_per_job
    jobs = partitions * -(-shards // per_job)  # generation jobs
    fill_outputs(wd, partitions, shards, shards_per_job)
    noop, noop_cpu, out = snakemake(wd, "-n")
    assert "Nothing to be done" in out or out.strip() == "", out[-2000:]
    return {"shards": partitions * shards, "jobs": jobs, "dry_run_s": dry, "dry_cpu_s": dry_cpu,
            "noop_s": noop, "noop_cpu_s": noop_cpu}


FLOOR = """
rule all:
    input: expand("out/p{p}/s{s}.txt", p=range(PARTS), s=range(SHARDS))
rule one:
    input: "in/p{p}"
    output: "out/p{p}/s{s}.txt"
    log: "logs/p{p}/s{s}.log"
    shell: "echo {wildcards.s} > {output}"
rule folder:
    output: directory("in/p{p}")
    shell: "mkdir -p {output}"
"""

# The trivial Snakefile's jobs with what a generation job declares (rules/pseudo_labels.smk's
# generate_shard: four wildcards, the resources of rules/common.smk's job_resources, params records,
# settings and pool, a conda environment, five shell fields), without modelmake's code.
FLOOR_DECLARED = """
rule all:
    input: expand("out/d/t/p{p}/s{s}.txt", p=range(PARTS), s=range(SHARDS))
rule one:
    input: shards="in/p{p}"
    output: "out/{d}/{t}/p{p}/s{s}.txt"
    params:
        records="in/p{p}/s{s}.jsonl",
        settings=SETTINGS,
        pool=POOL,
    log: "logs/{d}/{t}/p{p}/s{s}.log"
    threads: 1
    resources: mem_mb=2000, runtime=240, gpu=0, cpus_per_task=1, nodes=1, slurm_partition="cpu"
    conda: "env.yaml"
    shell: "echo {params.records:q} --out {output:q} --settings {params.settings:q} --pool {params.pool:q} > {log:q}"
rule folder:
    output: directory("in/p{p}")
    shell: "mkdir -p {output}"
"""
SETTINGS = {"concurrency": 16, "config_key": "pseudo_labels", "ending_user_turn": "answer",
            "max_conversation_tokens": 384, "max_failure_share": 0.05, "regenerate": "assistant", "retries": 4,
            "sampling": {"ignore_eos": False, "max_tokens": 64, "seed": 0, "temperature": 0.0, "top_p": 1.0},
            "teacher_source": {"path": "/tmp/model"}}
POOL = {"folder": "/tmp/results/serve/teacher/part{p}", "logs": "/tmp/results/logs/serve/teacher/part{p}",
        "idle_timeout_s": 15, "ready_timeout_s": 900,
        "spec": {"cpu_kvcache_gib": 1, "cpu_threads_per_server": 1, "device_lock_dir": None, "dtype": "float32",
                 "enforce_eager": True, "gpu_memory_utilization": None, "health_interval_s": 2,
                 "max_model_len": 512, "model": "/tmp/model", "seed": 0, "served_name": "teacher", "servers": 2,
                 "tensor_parallel_size": 1, "vllm_args": []}}


def measure_floor(root: Path, partitions: int, shards: int, snakefile: str, name: str) -> dict:
    wd = root / name
    wd.mkdir()
    text = snakefile.replace("PARTS", str(partitions)).replace("SHARDS", str(shards))
    text = text.replace("SETTINGS", repr(json.dumps(SETTINGS))).replace("POOL", repr(json.dumps(POOL)))
    (wd / "Snakefile").write_text(text)
    (wd / "env.yaml").write_text("channels: [conda-forge]\ndependencies: [python]\n")
    cmd = [SNAKEMAKE, "-s", str(wd / "Snakefile"), "--directory", str(wd), "--cores", "2", "-n",
           "--quiet", "all"]
    dry, dry_cpu, _ = timed(cmd, wd, f"the {name} Snakefile")
    for p in range(partitions):
        (wd / f"in/p{p}").mkdir(parents=True)
    time.sleep(1.1)
    out_dir = "out/d/t" if "{d}" in snakefile else "out"
    for p in range(partitions):
        (wd / f"{out_dir}/p{p}").mkdir(parents=True)
        for s in range(shards):
            (wd / f"{out_dir}/p{p}/s{s}.txt").touch()
    noop, noop_cpu, out = timed(cmd, wd, f"the {name} Snakefile")
    assert "Nothing to be done" in out or not out.strip(), out[-2000:]
    return {"shards": partitions * shards, "jobs": partitions * shards, "dry_run_s": dry, "dry_cpu_s": dry_cpu,
            "noop_s": noop, "noop_cpu_s": noop_cpu}


STUB: Path | None = None  # the folder of the scontrol stand-in, first on the PATH of every Snakemake run


def main() -> None:
    global STUB
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--partitions", type=int, default=10)
    ap.add_argument("--shards", type=int, default=1000)
    ap.add_argument("--smoke", action="store_true",
                    help="2 x 5 shards vs 1 x 2: runs end to end, measures nothing")
    args = ap.parse_args()
    base_shards = 100
    if args.smoke:
        args.partitions, args.shards, base_shards = 2, 5, 2
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        STUB = scontrol_stub(root)
        base = measure(root, 1, base_shards)
        big = measure(root, args.partitions, args.shards)
        grouped = measure(root, args.partitions, args.shards, "partition")
        floor = measure_floor(root, args.partitions, args.shards, FLOOR, "trivial")
        declared = measure_floor(root, args.partitions, args.shards, FLOOR_DECLARED, "declared")
    rows = (("modelmake, a job per shard", base), ("modelmake, a job per shard", big),
            ("modelmake, a job per partition", grouped), ("trivial Snakefile", floor),
            ("trivial, generate_shard's declarations", declared))
    print(f"{'':>39} {'shards':>7} {'jobs':>6} {'dry run (s)':>12} {'cpu':>6} {'no-op rerun (s)':>16} {'cpu':>6}")
    for name, r in rows:
        print(f"{name:>39} {r['shards']:>7} {r['jobs']:>6} {r['dry_run_s']:>12.2f} {r['dry_cpu_s']:>6.2f} "
              f"{r['noop_s']:>16.2f} {r['noop_cpu_s']:>6.2f}")
    print("scontrol: a stand-in that fails at once (the SLURM plugin's `scontrol show config` at each start)")
    print(f"ratio {big['shards']}/{base['shards']} shards: dry run x{big['dry_run_s'] / base['dry_run_s']:.2f}, "
          f"no-op x{big['noop_s'] / base['noop_s']:.2f}")

    def ratio(a: dict, b: dict) -> str:
        return (f"dry run x{a['dry_run_s'] / b['dry_run_s']:.2f} (cpu x{a['dry_cpu_s'] / b['dry_cpu_s']:.2f}), "
                f"no-op x{a['noop_s'] / b['noop_s']:.2f} (cpu x{a['noop_cpu_s'] / b['noop_cpu_s']:.2f})")

    print(f"ratio modelmake / trivial Snakefile at {big['jobs']} jobs: {ratio(big, floor)}")
    print(f"ratio modelmake / trivial Snakefile with generate_shard's declarations: {ratio(big, declared)}")
    print(f"ratio trivial Snakefile with those declarations / without: {ratio(declared, floor)}")
    if args.smoke:
        print(common.SMOKE_NOTE)
    else:
        met = lambda ok: "met" if ok else "MISSED"  # noqa: E731
        print(f"targets: a job per shard within 1.1x of the trivial Snakefile (dry run) -> "
              f"{met(big['dry_run_s'] <= 1.1 * floor['dry_run_s'])}; a job per partition: dry run "
              f"{grouped['dry_run_s']:.2f} s < 5 s -> {met(grouped['dry_run_s'] < 5)}, no-op "
              f"{grouped['noop_s']:.2f} s < 3 s -> {met(grouped['noop_s'] < 3)}")


if __name__ == "__main__":
    main()
