"""Benchmark: Snakemake's planning time at scale (10,000 pseudo-label shards).

Measures, in one run and on this machine:
  * ``snakemake -n`` on a config with partitions x shards_per_partition = 10,000 shards, nothing built;
  * ``snakemake -n`` when every output exists (a no-op rerun: "Nothing to be done");
  * the same two for 100 shards, so the ratios show how planning scales;
  * the same two for a trivial Snakefile with as many jobs (one input folder, one output and a log
    per job: Snakemake's own floor on this machine), so the ratio shows modelmake's overhead.
The pseudo-label outputs of the no-op case are placeholders written by this script (nothing is
generated); the reformat and shard steps run for real.

Usage: python bench/bench_dag.py [--partitions 10] [--shards 1000] [--smoke]
--smoke: 2 partitions x 5 shards against a base of 1 x 2 (the same code paths in seconds; the test
suite runs it so the script cannot rot; its numbers are not benchmarks).
Targets from the foundation issue: < 10 s for the dry run, < 3 s for the no-op rerun (2 cores).
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

import common

REPO = common.REPO
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def make_workdir(root: Path, partitions: int, shards: int) -> Path:
    wd = root / f"p{partitions}x{shards}"
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
    cfg["pseudo_labels"].update(partitions=partitions, shards_per_partition=shards, datasets=["chat_en"])
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    return wd


def snakemake(wd: Path, *args: str) -> tuple[float, str]:
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(wd), "--configfile",
           str(wd / "config.yaml"), "--cores", "2", *args, "--quiet", "all"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=wd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"snakemake {' '.join(args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return dt, p.stdout + p.stderr


def fill_outputs(wd: Path, partitions: int, shards: int) -> None:
    """Build the real data steps, then place pseudo-label outputs so that nothing is left to do."""
    targets = [str(wd / f"results/data/chat_en/shards/train/part{p}") for p in range(partitions)]
    snakemake(wd, *targets)
    time.sleep(1.1)  # outputs must be newer than the shards at mtime resolution
    for d in ("chat_en",):
        base = wd / f"results/pseudo_labels/{d}/teacher"
        for p in range(partitions):
            (base / f"part{p}").mkdir(parents=True, exist_ok=True)
            for s in range(shards):
                (base / f"part{p}/shard{s}.jsonl").touch()
        time.sleep(0.05)
        for name in ("labels.parquet", "stats.json", "lengths.png"):
            (base / name).touch()


def measure(root: Path, partitions: int, shards: int) -> dict:
    wd = make_workdir(root, partitions, shards)
    dry, _ = snakemake(wd, "-n")
    fill_outputs(wd, partitions, shards)
    noop, out = snakemake(wd, "-n")
    assert "Nothing to be done" in out or out.strip() == "", out[-2000:]
    return {"shards": partitions * shards, "dry_run_s": dry, "noop_s": noop}


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


def measure_floor(root: Path, partitions: int, shards: int) -> dict:
    wd = root / "floor"
    wd.mkdir()
    (wd / "Snakefile").write_text(FLOOR.replace("PARTS", str(partitions)).replace("SHARDS", str(shards)))
    cmd = [SNAKEMAKE, "-s", str(wd / "Snakefile"), "--directory", str(wd), "--cores", "2", "-n",
           "--quiet", "all"]
    t = time.perf_counter()
    subprocess.run(cmd, cwd=wd, check=True, capture_output=True)
    dry = time.perf_counter() - t
    for p in range(partitions):
        (wd / f"in/p{p}").mkdir(parents=True)
    time.sleep(1.1)
    for p in range(partitions):
        (wd / f"out/p{p}").mkdir(parents=True)
        for s in range(shards):
            (wd / f"out/p{p}/s{s}.txt").touch()
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=wd, check=True, capture_output=True, text=True)
    noop = time.perf_counter() - t
    assert "Nothing to be done" in out.stdout + out.stderr or not out.stdout.strip()
    return {"shards": partitions * shards, "dry_run_s": dry, "noop_s": noop}


def main() -> None:
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
        base = measure(Path(tmp), 1, base_shards)
        big = measure(Path(tmp), args.partitions, args.shards)
        floor = measure_floor(Path(tmp), args.partitions, args.shards)
    print(f"{'':>22} {'shards':>8} {'dry run (s)':>12} {'no-op rerun (s)':>16}")
    for name, r in (("modelmake", base), ("modelmake", big), ("trivial Snakefile", floor)):
        print(f"{name:>22} {r['shards']:>8} {r['dry_run_s']:>12.2f} {r['noop_s']:>16.2f}")
    print(f"ratio {big['shards']}/{base['shards']} shards: dry run x{big['dry_run_s'] / base['dry_run_s']:.2f}, "
          f"no-op x{big['noop_s'] / base['noop_s']:.2f}")
    print(f"ratio modelmake / trivial Snakefile at {big['shards']} jobs: dry run "
          f"x{big['dry_run_s'] / floor['dry_run_s']:.2f}, no-op x{big['noop_s'] / floor['noop_s']:.2f}")
    if args.smoke:
        print(common.SMOKE_NOTE)
    else:
        print(f"targets: dry run < 10 s -> {'met' if big['dry_run_s'] < 10 else 'MISSED'}; "
              f"no-op < 3 s -> {'met' if big['noop_s'] < 3 else 'MISSED'}")


if __name__ == "__main__":
    main()
