"""The router's entrance (modelmake.router.data) on the shapes public router data come in, each in a
small file the test writes: judge scores on a declared scale (MT-Bench 1-10, 0/1 correctness, 0-1
judge scores) mapped to the 1..5 label, scores per model name (an object, or one column per model in
csv / parquet), label-only records in the source document's own shape, and what the splits need.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import pytest

from conftest import REPO, env
from modelmake.errors import RecordError, UserError
from modelmake.router.data import read_scored, score_label, score_settings, split_records, write_splits
from modelmake.router.evaluate import evaluate_scores
from modelmake.router.tokens import SOURCE_SYSTEM, conversation

SYSTEM = "[Instruction]\nPredict the score."
WEAK, STRONG = "mixtral-8x7b", "gpt-4-1106-preview"
MT_BENCH = {"weak": WEAK, "strong": STRONG, "scale": {"min": 1, "max": 10}}


def write_jsonl(path, rows, bom=False):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def label_only(i, k):
    """The source document's own training record: prompt and messages ending in [[k]], no scores."""
    return {"prompt": f"question {i}", "messages": conversation(f"question {i}", SYSTEM, k)}


# --- scales and the mapping to 1..5


@pytest.mark.parametrize("scores, values, labels", [
    ({"scale": {"min": 1, "max": 10}}, range(1, 11), [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]),  # MT-Bench grades
    ({"scale": {"min": 0, "max": 1}}, [0, 1], [1, 5]),  # correctness
    ({"scale": {"min": 0, "max": 1}}, [0.0, 0.19, 0.2, 0.5, 0.79, 0.8, 1.0], [1, 1, 2, 3, 4, 5, 5]),  # 0-1 judge
    ({"scale": {"min": 1, "max": 5}}, range(1, 6), [1, 2, 3, 4, 5]),  # the label's own scale: the identity
    ({"labels": [3, 5, 7, 9]}, [1, 3, 4.9, 5, 8, 9, 10], [1, 2, 2, 3, 4, 5, 5]),  # cut points
    ({"labels": {1: 1, 2: 1, 3: 2, 4: 4, 5: 5}}, [1, 2, 3, 4, 5], [1, 1, 2, 4, 5]),  # a table
    ({"labels": {"0": 1, "1": 5}}, [0.0, 1.0], [1, 5]),  # the table as JSON gives it the job (string keys)
])
def test_a_declared_scale_maps_weak_scores_to_the_five_labels(scores, values, labels):
    s = score_settings(scores)
    assert [score_label(v, s) for v in values] == labels


def test_a_score_missing_from_the_table_or_without_a_scale_has_no_label():
    with pytest.raises(ValueError, match=r"the score 6 is not in the router.scores.labels table \(1, 2\)"):
        score_label(6, score_settings({"labels": {1: 1, 2: 5}}))
    with pytest.raises(ValueError, match="router.scores.scale is not declared"):
        score_label(6, score_settings({}))


def test_mt_bench_grades_per_model_name_label_prompts_by_the_weak_models_grade(tmp_path):
    """{"prompt", "scores": {model: 1-10 grade}}: the label is the weak model's grade in five bins;
    both grades stay on their own scale for the evaluation; the conversation is built."""
    rows = [{"prompt": f"q{g}", "scores": {STRONG: 10, WEAK: g, "llama-2-70b": 3}} for g in range(1, 11)]
    src = write_jsonl(tmp_path / "mt_bench.jsonl", rows, bom=True)
    recs = read_scored([src], scores=MT_BENCH)
    assert [r["label"] for r in recs] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert [r["weak_score"] for r in recs] == list(map(float, range(1, 11)))
    assert {r["strong_score"] for r in recs} == {10.0} and {r["label_from"] for r in recs} == {"weak_score"}
    assert recs[2]["messages"] == conversation("q3", SOURCE_SYSTEM, 2)  # no record carries an instruction


def test_correctness_in_csv_columns_per_model(tmp_path):
    """One column per model (RouteLLM / RouterBench tables), 0/1 correctness written as text."""
    rows = [{"prompt": "a", WEAK: "1", STRONG: "1"}, {"prompt": "b", WEAK: "0", STRONG: "1"},
            {"prompt": "c", WEAK: "False", STRONG: "True"}, {"prompt": "d", WEAK: "0.0", STRONG: ""}]
    src = write_csv(tmp_path / "correct.csv", rows)
    recs = read_scored([src], scores={**MT_BENCH, "scale": {"min": 0, "max": 1}})
    assert [(r["label"], r["weak_score"], r["strong_score"]) for r in recs] == [
        (5, 1.0, 1.0), (1, 0.0, 1.0), (1, 0.0, 1.0), (1, 0.0, None)]  # an empty cell is no score


def test_judge_scores_in_parquet_columns_per_model_and_scores_objects_in_csv(tmp_path):
    rows = [{"question": f"q{i}", "mistralai/mixtral-8x7b-chat": s, "gpt-4-1106-preview": 0.9}
            for i, s in enumerate([0.05, 0.35, 0.55, 0.95])]
    src = write_parquet(tmp_path / "judge.parquet", rows)
    scores = {"weak": "mistralai/mixtral-8x7b-chat", "strong": STRONG, "scale": {"min": 0, "max": 1}}
    recs = read_scored([src], {"prompt": "question"}, scores)
    assert [r["label"] for r in recs] == [1, 2, 3, 5]
    cells = write_csv(tmp_path / "objects.csv", [{"prompt": "q", "scores": json.dumps({WEAK: 7, STRONG: 9})}])
    (rec,) = read_scored([cells], scores=MT_BENCH)
    assert (rec["label"], rec["weak_score"], rec["strong_score"]) == (4, 7.0, 9.0)


@pytest.mark.parametrize("shape, where", [("jsonl", ":3"), ("csv", ":row 3"), ("parquet", ":row 3")])
@pytest.mark.parametrize("model, grade", [(WEAK, 11), (STRONG, 0)])
def test_a_score_outside_the_declared_scale_is_an_error_with_file_and_row(tmp_path, shape, where, model, grade):
    rows = [{"prompt": f"q{i}", WEAK: 5, STRONG: 8} for i in range(4)]
    rows[2][model] = grade
    src = {"jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet}[shape](tmp_path / f"in.{shape}", rows)
    with pytest.raises(RecordError) as e:
        read_scored([src], scores=MT_BENCH)
    assert str(e.value).startswith(f"bad record in {src}{where}: \"{model}\" is {grade}, outside the declared "
                                   "router.scores.scale [1, 10]")


def test_without_a_declared_scale_scores_are_taken_as_they_are(tmp_path):
    """Today's configs: weak_score / strong_score on any numeric scale, the label from the messages."""
    rows = [{**label_only(i, 3), "weak_score": -2.5, "strong_score": 120} for i in range(2)]
    recs = read_scored([write_jsonl(tmp_path / "in.jsonl", rows)])
    assert [(r["label"], r["label_from"], r["weak_score"], r["strong_score"]) for r in recs] == [
        (3, "messages", -2.5, 120.0)] * 2


@pytest.mark.parametrize("row, scores, message", [
    ({"prompt": "q", "scores": {STRONG: 9}}, MT_BENCH,
     f"no label: no \"messages\" ending in the [[k]] answer and no weak model score to take it from (no score of "
     f"router.scores.weak '{WEAK}' (its scores name '{STRONG}' and no column '{WEAK}'))"),
    ({"prompt": "q", "weak_score": 7}, {},
     "the label would come from the weak model's score, but router.scores.scale is not declared"),
    ({"prompt": "q", "weak_score": 7}, {"labels": {8: 5}}, "the score 7 is not in the router.scores.labels table"),
    ({"prompt": "q", "weak_score": "good"}, {}, "\"weak_score\" must be a number, got 'good'"),
])
def test_a_record_without_a_label_says_what_to_add(tmp_path, row, scores, message):
    src = write_jsonl(tmp_path / "in.jsonl", [row])
    with pytest.raises(RecordError, match=re.escape(f"bad record in {src}:1: {message}")):
        read_scored([src], scores=scores)


# --- label-only records, the system instruction, the splits


def test_label_only_records_train_and_calibrate_and_the_test_split_comes_from_scored_ones(tmp_path):
    """The source document's training file beside a scored file: the label-only records land in
    train and calib (calibration needs no scores), test holds only records with both scores."""
    plain = write_jsonl(tmp_path / "train_data_sample.jsonl", [label_only(i, 1 + i % 5) for i in range(60)], bom=True)
    scored = write_parquet(tmp_path / "scored.parquet",
                           [{"prompt": f"scored {i}", "scores": {WEAK: 1 + i % 10, STRONG: 9}} for i in range(40)])
    recs = read_scored([plain, scored], scores=MT_BENCH)
    assert {r["system"] for r in recs} == {SYSTEM}  # the scored records take the label-only ones' instruction
    splits = split_records(recs, None, 0.2, 0.2, seed=0)
    assert {len(v) for v in splits.values()} == {20, 60}  # calib 20, test 20, train 60
    assert all(r["strong_score"] == 9 for r in splits["test"])
    assert any(r["weak_score"] is None for r in splits["calib"]) and any(r["weak_score"] is None for r in splits["train"])
    assert {r["label_from"] for r in splits["train"]} == {"messages", "weak_score"}


def test_too_few_scored_records_for_the_test_split_say_which_and_what_to_add(tmp_path):
    plain = write_jsonl(tmp_path / "plain.jsonl", [label_only(i, 3) for i in range(20)])
    with pytest.raises(UserError) as e:
        split_records(read_scored([plain]), None, 0.2, 0.2, seed=0)
    msg = str(e.value)
    assert msg.startswith("router.split.test: the test split needs 4 records with both the weak and the strong "
                          "model's score to evaluate routing on, and only 0 of the 16 records left after calib")
    assert re.search(re.escape(str(plain)) + r":\d+: no weak_score\)", msg)
    assert "router.scores.weak / strong" in msg and "set it to 0 to train and calibrate without evaluating" in msg


def test_test_share_zero_trains_and_calibrates_on_label_only_records(tmp_path):
    import pandas as pd

    plain = write_jsonl(tmp_path / "plain.jsonl", [label_only(i, 1 + i % 5) for i in range(20)])
    out = {name: tmp_path / f"{name}.parquet" for name in ("train", "calib", "test")}
    stats = write_splits([plain], out, tmp_path / "stats.json", n_sample=None, calib=0.2, test=0, seed=0, config={})
    assert {k: v["records"] for k, v in stats.items()} == {"calib": 4, "test": 0, "train": 16}
    assert stats["train"]["labels_from"] == {"messages": 16} and stats["train"]["with_both_scores"] == 0
    assert len(pd.read_parquet(out["test"])) == 0
    with pytest.raises(UserError, match="no prompts .router.split.test: 0 makes no test split"):
        evaluate_scores(pd.read_parquet(out["test"]))


def test_one_system_instruction_for_records_with_and_without_messages(tmp_path):
    plain = write_jsonl(tmp_path / "plain.jsonl", [label_only(0, 3)])
    scored = write_jsonl(tmp_path / "scored.jsonl", [{"prompt": "s", "weak_score": 4, "strong_score": 5}])
    one = {"scale": {"min": 1, "max": 5}}
    assert read_scored([scored], scores=one, system="Grade it.")[0]["messages"][0] == {
        "role": "system", "content": "Grade it."}
    with pytest.raises(RecordError, match=re.escape(f"2 different system instructions in {plain}, {scored} (first at "
                                                    f"{plain}:1 '[Instruction]\\nPredict the score.'; the records "
                                                    "without messages take router.system 'Grade it.')")):
        read_scored([plain, scored], scores=one, system="Grade it.")


def test_evaluation_names_the_scored_file_and_the_scores_it_lacks():
    import pandas as pd

    df = pd.DataFrame({"p_weak_ok": [0.2, 0.8], "weak_score": [1.0, None], "strong_score": [5.0, 5.0]})
    with pytest.raises(UserError, match=r"scores/test.parquet: 1 of 2 prompts have no 'weak_score'.*router.scores.weak"):
        evaluate_scores(df, name="scores/test.parquet")


def test_router_data_cli_takes_the_scores_settings_and_reports_file_and_row(tmp_path):
    rows = [{"prompt": f"q{i}", WEAK: 1 + i % 10, STRONG: 10} for i in range(20)]
    src = write_csv(tmp_path / "grades.csv", rows)
    e = env()
    e["PYTHONPATH"] = str(REPO / "src")
    out = [f"--{n}={tmp_path / n}.parquet" for n in ("train", "calib", "test")]
    cmd = [sys.executable, "-m", "modelmake", "router-data", str(src), *out, "--stats", str(tmp_path / "stats.json"),
           "--calib-share", "0.2", "--test-share", "0.2", "--scores", json.dumps(MT_BENCH), "--system", "Grade it."]
    subprocess.run(cmd, env=e, check=True, capture_output=True)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["test"]["with_both_scores"] == 4 and stats["test"]["strong_score_mean"] == 10.0
    rows[6][STRONG] = 12
    write_csv(src, rows)
    bad = subprocess.run(cmd, env=e, text=True, capture_output=True)
    assert bad.returncode == 2 and f"bad record in {src}:row 7: \"{STRONG}\" is 12, outside" in bad.stderr


def test_config_refuses_two_places_for_one_score_and_bad_scales(monkeypatch):
    import copy

    import yaml

    from modelmake.config import validate
    from modelmake.errors import ConfigError

    monkeypatch.chdir(REPO)
    c = copy.deepcopy(yaml.safe_load((REPO / "config.yaml").read_text()))
    c["router"].update(fields={"weak_score": "score_8b"}, scores={"weak": WEAK, "scale": {"min": 10, "max": 1}})
    with pytest.raises(ConfigError) as e:
        validate(c)
    assert "router.scores.weak and router.fields.weak_score both say where the weak model's score is" in str(e.value)
    assert "router.scores.scale: min 10 must be below max 1" in str(e.value)
    c["router"].update(fields={}, scores={"scale": {"min": 1, "max": 10}, "labels": {0: 1, 10: 5}})
    with pytest.raises(ConfigError, match=r"router.scores.labels: the score 0 is outside router.scores.scale \[1, 10\]"):
        validate(c)
    c["router"].update(scores={"labels": [1, 2, 2, 3]})
    with pytest.raises(ConfigError, match=r"the cut points \[1, 2, 2, 3\] must be ascending"):
        validate(c)


def test_dry_run_with_no_test_split_plans_no_evaluation(tmp_path):
    from conftest import run_snakemake, small_config, write_config
    from test_workflow_dry import jobs_planned

    write_config(tmp_path, small_config(tmp_path, **{"router.split": {"calib": 0.2, "test": 0},
                                                     "router.system": "It's [[k]]."}))
    out = run_snakemake(tmp_path, "-n", "-p").stdout
    assert {k: v for k, v in jobs_planned(out).items() if k.startswith("router_")} == {
        "router_data": 1, "router_train": 1, "router_score": 1, "router_calibrate": 1}
    assert "--system 'It'\"'\"'s [[k]].'" in out
