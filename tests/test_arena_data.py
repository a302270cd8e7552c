"""The arena entrance on the shapes real pair data has: LMSYS and Kaggle winner spellings and one-hot
columns, ties under both policies, multi-turn pairs (JSON-encoded lists with nulls, conversation_a/b),
no language, and bad records failing with file:line or skipped to a rejects file and counted."""

from __future__ import annotations

import csv
import json
import math

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from modelmake.arena.data import prepare, read_pairs, swap
from modelmake.arena.evaluate import metrics
from modelmake.arena.model import hard_targets
from modelmake.arena.stages import training_data
from modelmake.errors import RecordError


def pair(rid, winner="model_a", **extra) -> dict:
    return {"id": rid, "prompt": f"prompt {rid}", "response_a": f"a {rid}", "response_b": f"b {rid}",
            "winner": winner, "language": "en", **extra}


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


# Kaggle LMSYS (lmsys-chatbot-arena/train.csv): integer ids, JSON-encoded turn lists (nulls inside),
# one-hot winners, no language
KAGGLE = [
    {"id": 30192, "model_a": "gpt-4-1106-preview", "model_b": "gpt-4-0613",
     "prompt": json.dumps(["Is it morally right to try to have a certain percentage of females?", "And then?"]),
     "response_a": json.dumps(["The question is complex.", "Then it depends."]),
     "response_b": json.dumps(["As an AI, I don't have opinions.", None]),
     "winner_model_a": 1, "winner_model_b": 0, "winner_tie": 0},
    {"id": 53567, "model_a": "koala-13b", "model_b": "gpt-4-0613",
     "prompt": json.dumps(["What is the difference between marriage license and marriage certificate?"]),
     "response_a": json.dumps(["A marriage license is a legal document."]),
     "response_b": json.dumps(["A marriage license and a certificate are two different documents."]),
     "winner_model_a": 0, "winner_model_b": 1, "winner_tie": 0},
    {"id": 65089, "model_a": "gpt-3.5-turbo-0613", "model_b": "mistral-medium",
     "prompt": json.dumps(["explain function calling. how would you call a function?"]),
     "response_a": json.dumps(["Function calling is the process of invoking a function."]),
     "response_b": json.dumps(["Function calling is the process of executing a function."]),
     "winner_model_a": 0, "winner_model_b": 0, "winner_tie": 1},
]


def write_kaggle(tmp_path, fmt: str) -> str:
    path = tmp_path / f"train.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(KAGGLE), path)
    else:
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(KAGGLE[0]))
            w.writeheader()
            w.writerows(KAGGLE)
    return str(path)


# --- winners and ties ---------------------------------------------------------------------------


@pytest.mark.parametrize("spelling,winner", [
    ("model_a", "model_a"), ("model_b", "model_b"), ("tie", "tie"), ("tie (bothbad)", "tie"),
    ("model_1", "model_a"), ("model_2", "model_b"), ("a", "model_a"), ("B", "model_b"), (" Model_A ", "model_a"),
])
def test_every_winner_spelling_is_read(tmp_path, spelling, winner):
    src = write_jsonl(tmp_path / "pairs.jsonl", [pair("x", spelling)])
    (row,), _ = read_pairs([src], labelled=True)
    assert row["winner"] == winner


def test_an_unknown_winner_fails_with_file_and_line_and_names_the_spellings(tmp_path):
    src = write_jsonl(tmp_path / "pairs.jsonl", [pair("x"), pair("y", "model_c")])
    with pytest.raises(RecordError, match=r"(?s)pairs\.jsonl:2: 'winner' must be one of model_a, model_b, tie, "
                                          r"tie \(bothbad\), model_1, model_2, a, b.*got 'model_c'.*arena\.on_error: skip"):
        read_pairs([src], labelled=True)


def test_ties_are_dropped_and_counted_under_drop(tmp_path):
    src = write_jsonl(tmp_path / "pairs.jsonl", [pair("x"), pair("t1", "tie"), pair("y", "model_b"),
                                                 pair("t2", "tie (bothbad)")])
    out, stats = tmp_path / "l.parquet", tmp_path / "l.stats.json"
    prepare([src], out, labelled=True, folds=2, config={}, ties="drop", stats_path=stats)
    assert list(pd.read_parquet(out)["id"]) == ["x", "y"]
    counted = json.loads(stats.read_text())
    assert counted["ties"] == {"policy": "drop", "found": 2, "dropped": 2, "kept": 0}
    assert counted["read"] == 4 and counted["written"] == 2 and counted["winner"] == {"model_a": 1, "model_b": 1}


def test_ties_train_as_half_half_under_soft_and_stay_ties_when_swapped(tmp_path):
    src = write_jsonl(tmp_path / "pairs.jsonl", [pair(f"p{i}", w) for i, w in
                                                 enumerate(["model_a", "tie", "model_b", "tie (bothbad)"] * 3)])
    out, stats = tmp_path / "l.parquet", tmp_path / "l.stats.json"
    prepare([src], out, labelled=True, folds=2, config={}, ties="soft", stats_path=stats)
    df = pd.read_parquet(out)
    assert json.loads(stats.read_text())["ties"] == {"policy": "soft", "found": 6, "dropped": 0, "kept": 6}
    assert (df["winner"] == "tie").sum() == 6
    # training reads the labelled folds through the soft-target path: a tie is 0.5/0.5, label
    # smoothing or not; swapping a pair keeps a tie a tie
    valid_fold = int(df["fold"].iloc[0])
    train, _ = training_data(df, [], valid_fold=valid_fold, label_smoothing=0.2)
    want = {"model_a": 0.9, "model_b": 0.1, "tie": 0.5}
    assert list(train["p_a"]) == pytest.approx([want[w] for w in train["winner"]])
    assert (train["winner"] == "tie").any()
    assert list(swap(df)["winner"]) == [{"model_a": "model_b", "model_b": "model_a", "tie": "tie"}[w]
                                         for w in df["winner"]]
    assert list(swap(train)["p_a"]) == pytest.approx([1 - want[w] for w in train["winner"]])
    with pytest.raises(ValueError, match="unknown winner 'draw'"):
        hard_targets(["draw"])


def test_metrics_count_ties_as_half_half_in_log_loss_and_leave_them_out_of_accuracy():
    m = metrics([0.8, 0.3, 0.6], ["model_a", "model_b", "tie"])
    want = -(math.log(0.8) + math.log(0.7) + 0.5 * math.log(0.6) + 0.5 * math.log(0.4)) / 3
    assert m == {"log_loss": pytest.approx(want, abs=1e-5), "accuracy": 1.0, "n": 3, "ties": 1}
    assert metrics([0.5], ["tie"])["log_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert math.isnan(metrics([0.5], ["tie"])["accuracy"])


# --- Kaggle LMSYS files: one-hot winners, JSON-encoded multi-turn lists, nulls, no language --------


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_kaggle_one_hot_columns_and_json_encoded_turns(tmp_path, fmt):
    src = write_kaggle(tmp_path, fmt)
    out, stats = tmp_path / "l.parquet", tmp_path / "l.stats.json"
    prepare([src], out, labelled=True, folds=2, config={}, ties="soft", stats_path=stats)
    rows = pq.read_table(out).to_pylist()
    assert [(r["id"], r["winner"], r["language"]) for r in rows] == [
        ("30192", "model_a", "unknown"), ("53567", "model_b", "unknown"), ("65089", "tie", "unknown")]
    first = rows[0]
    assert first["prompt"] == ["Is it morally right to try to have a certain percentage of females?", "And then?"]
    assert first["response_a"] == ["The question is complex.", "Then it depends."]
    assert first["response_b"] == ["As an AI, I don't have opinions.", ""]  # a null turn: no answer
    counted = json.loads(stats.read_text())
    assert counted["turns"] == {"1": 2, "2": 1} and counted["null_turns"] == 1
    assert counted["languages"] == {"unknown": 3} and counted["ties"]["kept"] == 1


def test_one_hot_columns_that_do_not_name_one_winner_are_bad_records(tmp_path):
    rows = [{**KAGGLE[0], "winner_model_b": 1}, {**KAGGLE[1], "winner_tie": 2}, {**KAGGLE[2], "id": 1}]
    src = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    with pytest.raises(RecordError, match=r"train\.parquet:row 1: exactly one of winner_model_a, winner_model_b, "
                                          r"winner_tie must be 1, got winner_model_a, winner_model_b"):
        read_pairs([src], labelled=True)
    rejects = tmp_path / "rejects.jsonl"
    counts = prepare([src], tmp_path / "l.parquet", labelled=True, folds=2, config={}, ties="soft",
                     on_error="skip", rejects=rejects)
    assert [(r["row"], r["kind"]) for r in read_jsonl(rejects)] == [(1, "unknown winner"), (2, "unknown winner")]
    assert "'winner_tie' must be 0 or 1, got 2" in read_jsonl(rejects)[1]["error"]
    assert json.loads(read_jsonl(rejects)[0]["raw"])["id"] == 30192  # a table row: the record as JSON
    assert counts["written"] == 1


def test_a_pair_with_neither_winner_nor_one_hot_columns_names_the_keys_to_set(tmp_path):
    src = write_jsonl(tmp_path / "pairs.jsonl", [{k: v for k, v in pair("x").items() if k != "winner"}])
    with pytest.raises(RecordError, match=r"pairs\.jsonl:1: no field 'winner'.*arena\.fields\.winner.*winner_tie"):
        read_pairs([src], labelled=True)
    (row,), _ = read_pairs([src], labelled=False)  # unlabelled pairs need none
    assert "winner" not in row


def test_turn_lists_that_do_not_line_up_are_bad_records_with_file_and_line(tmp_path):
    src = write_jsonl(tmp_path / "pairs.jsonl", [
        pair("x", prompt=["q1", "q2"], response_a=["a1", "a2"], response_b=["b1", "b2"]),  # real lists
        pair("y", prompt=json.dumps(["q1", "q2"]), response_a=json.dumps(["a1"]), response_b=json.dumps(["b1", "b2"])),
    ])
    with pytest.raises(RecordError, match=r"pairs\.jsonl:2: the prompt has 2 turns, response_a 1 and response_b 2"):
        read_pairs([src], labelled=True)


def test_a_plain_prompt_that_looks_like_json_stays_text(tmp_path):
    src = write_jsonl(tmp_path / "pairs.jsonl", [pair("x", prompt='["a", "b"]')])
    (row,), _ = read_pairs([src], labelled=True)
    assert row["prompt"] == ['["a", "b"]'] and row["response_a"] == ["a x"]


# --- public arena dumps: conversation_a / conversation_b ----------------------------------------


def battle(rid, turns_a, turns_b, winner="model_a", user_b=None):
    conv = lambda users, answers: [m for u, a in zip(users, answers)  # noqa: E731
                                   for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
    users = [f"question {i}" for i in range(len(turns_a))]
    return {"question_id": rid, "model_a": "vicuna-13b", "model_b": "koala-13b", "winner": winner,
            "conversation_a": conv(users, turns_a), "conversation_b": conv(user_b or users, turns_b),
            "turn": len(users), "anony": True, "language": "English"}


def test_conversation_a_and_b_become_turns(tmp_path):
    records = [battle("q1", ["a1", "a2"], ["b1", "b2"], "tie (bothbad)"), battle("q2", ["a"], ["b"], "model_b")]
    src = tmp_path / "arena.parquet"  # lmsys/chatbot_arena_conversations: list<struct<content, role>>
    pq.write_table(pa.Table.from_pylist(records), src)
    rows, _ = read_pairs([src], labelled=True, fields={"id": "question_id"})
    assert rows[0] == {"id": "q1", "prompt": ["question 0", "question 1"], "response_a": ["a1", "a2"],
                       "response_b": ["b1", "b2"], "language": "English", "winner": "tie"}
    assert rows[1]["winner"] == "model_b" and rows[1]["prompt"] == ["question 0"]
    # as JSON lines, and as JSON text in a CSV cell, the same
    js = write_jsonl(tmp_path / "arena.jsonl", records)
    assert read_pairs([js], labelled=True, fields={"id": "question_id"})[0] == rows
    with open(tmp_path / "arena.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(records[0]))
        w.writeheader()
        w.writerows({**r, "conversation_a": json.dumps(r["conversation_a"]),
                     "conversation_b": json.dumps(r["conversation_b"])} for r in records)
    assert read_pairs([tmp_path / "arena.csv"], labelled=True, fields={"id": "question_id"})[0] == rows


def test_conversations_with_different_user_turns_are_refused(tmp_path):
    src = write_jsonl(tmp_path / "arena.jsonl", [
        battle("q1", ["a1", "a2"], ["b1", "b2"]),
        battle("q2", ["a1", "a2"], ["b1", "b2"], user_b=["question 0", "something else"]),
    ])
    with pytest.raises(RecordError, match=r"arena\.jsonl:2: 'conversation_a' and 'conversation_b' differ at user turn 1"):
        read_pairs([src], labelled=True, fields={"id": "question_id"})


# --- language, ids, bad records -----------------------------------------------------------------


def test_language_is_optional(tmp_path):
    src = write_jsonl(tmp_path / "pairs.jsonl", [{k: v for k, v in pair("x").items() if k != "language"},
                                                 pair("y", language=""), pair("z", language="zh")])
    out, stats = tmp_path / "u.parquet", tmp_path / "u.stats.json"
    prepare([src], out, labelled=False, folds=2, config={}, stats_path=stats)
    assert list(pd.read_parquet(out)["language"]) == ["unknown", "unknown", "zh"]
    assert json.loads(stats.read_text())["languages"] == {"unknown": 2, "zh": 1}


def test_a_duplicate_id_is_refused_with_both_places(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [pair("x"), pair("7")])
    second = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist([{**pair("y"), "id": 7}]), second)  # an integer id is its text
    with pytest.raises(RecordError, match=rf"b\.parquet:row 1: id '7' already used at {first}:2; ids must be unique"):
        read_pairs([first, second], labelled=True)


def mixed_file(tmp_path) -> str:
    lines = [json.dumps(pair("g1")), "{not json", json.dumps(pair("g2", "draw")),
             json.dumps({k: v for k, v in pair("g3").items() if k != "response_b"}),
             json.dumps(pair("g1", "model_b")), json.dumps(pair("g4", prompt=7)), json.dumps(pair("g5", "tie")),
             json.dumps(pair("g6", "b"))]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_skip_moves_bad_records_to_the_rejects_file_and_counts_them(tmp_path):
    src = mixed_file(tmp_path)
    out, rejects, stats = tmp_path / "l.parquet", tmp_path / "l.rejects.jsonl", tmp_path / "l.stats.json"
    prepare([src], out, labelled=True, folds=2, config={}, ties="drop", on_error="skip", rejects=rejects,
            stats_path=stats)
    assert list(pd.read_parquet(out)["id"]) == ["g1", "g6"]
    bad = read_jsonl(rejects)
    assert [(r["file"], r["line"], r["kind"]) for r in bad] == [
        (src, 2, "bad JSON"), (src, 3, "unknown winner"), (src, 4, "missing field"), (src, 5, "duplicate id"),
        (src, 6, "wrong type")]
    assert bad[3]["error"].startswith(f"id 'g1' already used at {src}:1")
    assert json.loads(bad[1]["raw"])["winner"] == "draw"  # the line as it was
    counted = json.loads(stats.read_text())
    assert (counted["read"], counted["written"], counted["rejected"]) == (8, 2, 5)
    assert counted["reasons"] == {"bad JSON": 1, "unknown winner": 1, "missing field": 1, "duplicate id": 1,
                                  "wrong type": 1}
    assert counted["ties"] == {"policy": "drop", "found": 1, "dropped": 1, "kept": 0}


def test_fail_stops_at_the_first_bad_record_and_writes_nothing(tmp_path):
    src = mixed_file(tmp_path)
    out, rejects, stats = tmp_path / "l.parquet", tmp_path / "l.rejects.jsonl", tmp_path / "l.stats.json"
    with pytest.raises(RecordError, match=rf"{src}:2: bad JSON.*\nFix the line or set arena\.on_error: skip"):
        prepare([src], out, labelled=True, folds=2, config={}, on_error="fail", rejects=rejects, stats_path=stats)
    assert not out.exists() and not rejects.exists() and not stats.exists()


def test_prepare_from_the_command_line_writes_rejects_and_stats(tmp_path):
    import subprocess
    import sys

    src = mixed_file(tmp_path)
    base = [sys.executable, "-m", "modelmake", "arena-prepare", src, "--labelled", "--out", str(tmp_path / "l.parquet"),
            "--rejects", str(tmp_path / "r.jsonl"), "--stats", str(tmp_path / "s.json")]
    proc = subprocess.run(base, capture_output=True, text=True)
    assert proc.returncode == 2 and f"modelmake: bad record in {src}:2: bad JSON" in proc.stderr
    proc = subprocess.run([*base, "--on-error", "skip", "--ties", "soft"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert list(pd.read_parquet(tmp_path / "l.parquet")["winner"]) == ["model_a", "tie", "model_b"]
    assert len(read_jsonl(tmp_path / "r.jsonl")) == 5
    assert json.loads((tmp_path / "s.json").read_text())["ties"]["kept"] == 1
