"""The router pipeline through real Snakemake on a small config: data -> ZeRO-3 training (killed
once, then resumed) -> consolidation -> scores -> calibration -> evaluation, then reruns.

The base model is a tiny random Llama given by path (so no demo asset is built); the data are the
1000 demo prompts: 600 to train on, 150 to calibrate, 250 to evaluate routing.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, Started, env, run_snakemake, small_config, wait_until, write_config
from test_router import DEMO, make_tiny_base
from test_workflow_dry import jobs_planned

pytestmark = pytest.mark.slow

TARGETS = ["results/router/t/eval/metrics.json", "results/router/t/eval/curve.png",
           "results/router/t/route/calibration.json"]


def targets(workdir) -> list[str]:
    """The router's targets as absolute paths (the config's results folder is absolute)."""
    return [str(workdir / t) for t in TARGETS]


def router_config(workdir, base, **overrides):
    raw = workdir / "raw" / "scored.jsonl"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(DEMO.read_text())
    cfg = small_config(workdir)
    cfg["models"]["router_base"] = {"path": str(base)}
    r = cfg["router"]
    # A random tiny base learns routing only from enough records and steps: with 120 training records
    # and 30 steps (the old config) it learnt the answer format and the label prior, then stopped
    # (APGR 0.503, label accuracy below the majority's); 600 records, 152 steps at lr 0.02 learn it.
    r.update(run="t", data=[str(raw)], n_sample=1000, split={"calib": 0.15, "test": 0.25})
    r["scale"]["deepspeed"] = str(REPO / "config/router/zero3.json")
    r["train"].update(epochs=4, batch_size=16, lr=0.02, max_length=512, save_steps=20, logging_steps=10)
    for k, v in overrides.items():
        node = cfg
        *parents, last = k.split(".")
        for p in parents:
            node = node[p]
        node[last] = v
    return cfg


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One workflow folder: the training job killed after its first checkpoint, then the rerun."""
    workdir = tmp_path_factory.mktemp("router_wf")
    base = make_tiny_base(workdir / "base", hidden=32)
    write_config(workdir, router_config(workdir, base))
    ckpt = workdir / "results/router/t/ckpt"
    run = Started(workdir, *targets(workdir))
    try:
        wait_until(lambda: any(ckpt.glob("checkpoint-*/trainer_state.json")) or run.proc.poll() is not None,
                   timeout=300, what="the first training checkpoint")
    finally:
        run.close()
    killed_at = sorted(int(p.parent.name.split("-")[1]) for p in ckpt.glob("checkpoint-*/trainer_state.json"))
    assert not (workdir / "results/router/t/zero3").exists(), "training finished before it could be killed"
    out = run_snakemake(workdir, *targets(workdir)).stdout
    return workdir, killed_at, out


def test_killed_training_resumes_from_its_last_checkpoint(built):
    workdir, killed_at, _ = built
    assert killed_at, "no checkpoint was written before the kill"
    log = (workdir / "results/logs/router/t/train.log").read_text()
    assert f"resuming from {workdir / 'results/router/t/ckpt'}/checkpoint-" in log
    metrics = json.loads((workdir / "results/router/t/zero3/metrics.json").read_text())
    assert metrics["resumed_from"] and int(metrics["resumed_from"].rsplit("-", 1)[1]) >= killed_at[0]
    assert metrics["steps"] == 4 * 38  # 600 train records / 16 per step x 4 epochs: nothing lost or repeated


def test_the_demo_outputs_metrics_curve_and_a_loadable_consolidated_model(built):
    from transformers import AutoModelForCausalLM

    from modelmake.files import read_json

    workdir, _, _ = built
    res = workdir / "results/router/t"
    m = read_json(res / "eval/metrics.json")
    for method in ("router", "random", "optimal"):
        assert {"APGR", "CPT(50%)", "CPT(80%)", "curve"} <= set(m["methods"][method])
    assert m["methods"]["random"]["APGR"] == pytest.approx(0.5)
    # the router learnt its answer format: the tiny random base's held-out loss is ~ln(vocab) = 6
    assert read_json(res / "zero3/metrics.json")["eval_loss"] < 2.0  # measured 0.60 (lr 1e-12: 5.96)
    assert m["prompts"] == 250 and [r["strong_share"] for r in m["calibrated"]] == [0.2, 0.5, 0.8]
    assert (res / "eval/curve.png").read_bytes().startswith(b"\x89PNG")
    cal = read_json(res / "route/calibration.json")
    assert [r["reference_strong_share"] for r in cal["thresholds"]] == pytest.approx([0.2, 0.5, 0.8], abs=0.05)
    assert read_json(res / "model/provenance.json")["counts"]["verified_against_digest"] is True
    assert (res / "model/manifest.json").is_file() and (res / "model/router.json").is_file()
    AutoModelForCausalLM.from_pretrained(res / "model")


def test_the_router_routes_better_than_a_random_router(built):
    """APGR on the 250 held-out prompts: a random router 0.5 (sd 0.014 over random orders of these
    prompts), the optimal one 0.695, one that knew each prompt's topic 0.628. Measured 0.620 here
    (label accuracy 0.46, majority class 0.28); the same config trained in-process with seeds 0..6:
    0.580 .. 0.628 (lr 1e-12: 0.462)."""
    from modelmake.files import read_json

    workdir, _, _ = built
    m = read_json(workdir / "results/router/t/eval/metrics.json")
    assert m["methods"]["router"]["APGR"] > 0.55


def test_route_cli_sends_each_prompt_to_strong_or_weak(built):
    workdir, _, _ = built
    res = workdir / "results/router/t"
    prompts = workdir / "prompts.txt"
    prompts.write_text("Hi there!\nProve that there are infinitely many primes.\nWhat is the capital of Peru?\n")
    e = env()
    e["PYTHONPATH"] = str(REPO / "src")
    proc = subprocess.run([sys.executable, "-m", "modelmake", "router-route", "--model", str(res / "model"),
                           "--calibration", str(res / "route/calibration.json"), "--strong-share", "0.5",
                           "--prompts", str(prompts)], env=e, text=True, capture_output=True, check=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == prompts.read_text().splitlines()
    assert all(r["route"] in ("strong", "weak") and 0 <= r["p_weak_ok"] <= 1 for r in rows)
    bad = subprocess.run([sys.executable, "-m", "modelmake", "router-route", "--model", str(res / "model"),
                          "--calibration", str(res / "route/calibration.json"), "--prompts", str(prompts)],
                         env=e, text=True, capture_output=True)
    assert bad.returncode == 2 and "pick one (--strong-share)" in bad.stderr


def test_second_run_has_nothing_to_do_and_new_shares_redo_only_calibration(built):
    workdir, _, _ = built
    assert "Nothing to be done" in run_snakemake(workdir, "-n", *targets(workdir)).stdout
    cfg = json.loads(json.dumps(__import__("yaml").safe_load((workdir / "config.yaml").read_text())))
    cfg["router"]["route"]["strong_shares"] = [0.3]
    write_config(workdir, cfg)
    planned = jobs_planned(run_snakemake(workdir, "-n", *targets(workdir)).stdout)
    assert planned == {"router_calibrate": 1, "router_evaluate": 1}
