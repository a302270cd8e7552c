"""The router's labels built by the workflow (modelmake.router.labels), without servers: the judge's
replies parsed into grades, the constraint asked of vLLM, the prompts, and the chain prompts ->
answers -> judge conversations -> retry -> scored prompts -> router data, on generation output
records written here in the shape ``modelmake generate`` writes them.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from modelmake.errors import RecordError, UserError
from modelmake.files import read_jsonl
from modelmake.router.data import read_scored
from modelmake.router.labels import (
    collect_grades, constraint_body, fill, parse_grade, within_constraint, write_judge_inputs, write_prompts,
    write_retry_inputs,
)

MT = {"min": 1, "max": 10}
TEMPLATE = "Q: {question}\nA: {answer}\nRate {min}-{max} as Rating: [[k]]. JSON stays: {\"a\": 1}"


@pytest.mark.parametrize("reply, grade, how", [
    ("The answer is helpful and accurate.\n\nRating: [[8]]", 8, "rating_brackets"),
    ("Good. [[7]]", 7, "brackets"),
    ("Rating: 6", 6, "rating"),
    ("**Rating:** 9/10", 9, "rating"),
    ("rating: [4]", 4, "rating"),
    ("Rating: [[ 7.5 ]]", 7.5, "rating_brackets"),
    ("**Rating**: [[3]]", 3, "rating_brackets"),
    # the first form present decides: a stray [[k]] does not beat "Rating: [[k]]"
    ("Better than a [[2]] answer. Rating: [[6]]", 6, "rating_brackets"),
    ("Rating: [[5]] ... so, once more, Rating: [[5]]", 5, "rating_brackets"),
])
def test_a_judges_grade_is_read_from_each_format(reply, grade, how):
    assert parse_grade(reply, MT) == (grade, how)


@pytest.mark.parametrize("reply, finish, why", [
    ("The answer is fine, I would say quite good.", "stop", "no_grade"),
    ("The answer is fine, I would say", "length", "truncated"),
    ("", "stop", "no_grade"),
    (None, None, "no_grade"),
    ('I must follow the format "Rating: [[5]]". Rating: [[8]]', "stop", "ambiguous"),
    ("Rating: [[11]]", "stop", "out_of_scale"),
    ("Rating: [[0]]", "stop", "out_of_scale"),
    ("Rating: 4/5", "stop", "other_scale"),
    ("Rating: [[rating]]", "stop", "no_grade"),
])
def test_a_reply_without_one_clear_grade_on_the_scale_has_none_and_says_why(reply, finish, why):
    assert parse_grade(reply, MT, finish) == (None, why)


def test_the_constraint_is_asked_in_the_servers_api_and_a_retry_asks_for_the_grade_only():
    choice = [f"Rating: [[{k}]]" for k in range(1, 11)]
    assert constraint_body("grade", "structured_outputs", MT) == {"structured_outputs": {"choice": choice}}
    assert constraint_body("grade", "guided", MT) == {"guided_choice": choice}
    explained = constraint_body("explained", "structured_outputs", MT)["structured_outputs"]["regex"]
    assert constraint_body("explained", "guided", MT) == {"guided_regex": explained}
    assert constraint_body("explained", "structured_outputs", MT, retry=True) == {"structured_outputs": {"choice": choice}}
    assert constraint_body("none", "structured_outputs", MT) is None
    assert constraint_body("none", "structured_outputs", MT, retry=True) is None


def test_a_reply_outside_the_constraint_is_noticed():
    assert within_constraint("Rating: [[10]]", "grade", MT)
    assert not within_constraint("Fine. Rating: [[10]]", "grade", MT)
    assert within_constraint("Short and right.\nRating: [[7]]", "explained", MT)
    assert not within_constraint("Short [and] right. Rating: [[7]]", "explained", MT)
    assert not within_constraint("Short and right. Rating: [[7]]", "explained", MT, retry=True)
    assert within_constraint("anything", "none", MT)


def test_the_template_fills_its_placeholders_only():
    out = fill(TEMPLATE, question="2+2?", answer="4", min=1, max=10)
    assert out == "Q: 2+2?\nA: 4\nRate 1-10 as Rating: [[k]]. JSON stays: {\"a\": 1}"
    # an answer holding a placeholder's name is not filled again
    assert fill("{question} / {answer}", question="{answer}", answer="x") == "{answer} / x"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_prompts_are_each_conversations_first_user_turn_with_the_dataset_in_the_id(tmp_path):
    pq = tmp_path / "train.parquet"
    pd.DataFrame({"id": ["a", "b", "c"], "messages": [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Later turn"}],
        [{"role": "assistant", "content": "I speak first"}, {"role": "user", "content": "no"}],
        [{"role": "user", "content": "Why is the sky blue?"}],
    ]}).to_parquet(pq)
    counts = write_prompts(tmp_path / "p.jsonl", datasets={"chat_en": pq})
    rows = read_jsonl(tmp_path / "p.jsonl")
    assert [(r["id"], r["prompt"]) for r in rows] == [("chat_en/a", "Hi?"), ("chat_en/c", "Why is the sky blue?")]
    assert rows[0]["messages"] == [{"role": "user", "content": "Hi?"}]
    assert counts == {"prompts": 2, "available": 2, "conversations_without_a_user_turn": 1}
    write_prompts(tmp_path / "one.jsonl", datasets={"chat_en": pq}, n=1, seed=3)
    assert len(read_jsonl(tmp_path / "one.jsonl")) == 1
    with pytest.raises(UserError, match=r"router.build_labels.prompts.n: 3 is more than the 2 prompts"):
        write_prompts(tmp_path / "x.jsonl", datasets={"chat_en": pq}, n=3)


def test_prompt_files_take_mapped_fields_an_optional_id_and_refuse_duplicates(tmp_path):
    src = write_jsonl(tmp_path / "q.jsonl", [{"question": "What is 2+2?"}, {"qid": "q2", "question": "Name a color."}])
    write_prompts(tmp_path / "p.jsonl", sources=[str(src)], fields={"prompt": "question", "id": "qid"})
    rows = read_jsonl(tmp_path / "p.jsonl")
    assert rows[1]["id"] == "q2" and len(rows[0]["id"]) > 8 and rows[0]["prompt"] == "What is 2+2?"
    dup = write_jsonl(tmp_path / "d.jsonl", [{"id": "x", "prompt": "a"}, {"id": "x", "prompt": "b"}])
    with pytest.raises(RecordError, match=r"d.jsonl:2: duplicate id 'x' \(first at .*d.jsonl:1\)"):
        write_prompts(tmp_path / "p2.jsonl", sources=[str(dup)])
    empty = write_jsonl(tmp_path / "e.jsonl", [{"id": "y", "prompt": "  "}])
    with pytest.raises(RecordError, match=r"e.jsonl:1: \"prompt\" must be a non-empty string"):
        write_prompts(tmp_path / "p3.jsonl", sources=[str(empty)])


def generated(rid, messages, reply, finish="stop"):
    """A row as modelmake generate writes it (reply None: the request failed)."""
    if reply is None:
        return {"id": rid, "messages": None, "error": "HTTP 400: too long", "generation": {}}
    return {"id": rid, "messages": [*messages, {"role": "assistant", "content": reply}],
            "generation": {"finish_reasons": [finish]}}


@pytest.fixture
def chain(tmp_path):
    """Six prompts answered by both models (p5's weak answer failed), written as generate writes them."""
    prompts = [{"id": f"p{i}", "prompt": f"question {i}", "messages": [{"role": "user", "content": f"question {i}"}]}
               for i in range(6)]
    write_jsonl(tmp_path / "prompts.jsonl", prompts)
    answers = {}
    for m in ("weak", "strong"):
        answers[m] = write_jsonl(tmp_path / f"{m}.jsonl", [
            generated(p["id"], p["messages"], None if (m, p["id"]) == ("weak", "p5") else f"{m} answer {p['id']}")
            for p in prompts])
    return tmp_path, answers


FIRST = {  # the judge's first replies by id: (text, finish); None: the request failed
    "weak/p0": ("Fine.\nRating: [[3]]", "stop"), "strong/p0": ("Rating: [[9]]", "stop"),
    "weak/p1": ("Meh. [[2]]", "stop"), "strong/p1": ("An excellent answer, which", "length"),
    "weak/p2": ("No grade here.", "stop"), "strong/p2": ("Rating: 8", "stop"),
    "weak/p3": ('Format "Rating: [[5]]": Rating: [[4]]', "stop"), "strong/p3": None,
    "weak/p4": ("Rating: [[12]]", "stop"), "strong/p4": ("Rating: [[7]]", "stop"),
    "strong/p5": ("Rating: [[10]]", "stop"),
}
RETRY = {  # the retries of the replies without a grade
    "strong/p1": ("Rating: [[8]]", "stop"), "weak/p2": ("Rating: [[1]]", "stop"),
    "weak/p3": ("Rating: [[4]]", "stop"), "strong/p3": ("Rating: [[6]]", "stop"), "weak/p4": ("still no", "stop"),
}


def judge(tmp_path, name, inputs, replies):
    rows = []
    for rec in read_jsonl(inputs):
        r = replies[rec["id"]]
        rows.append(generated(rec["id"], rec["messages"], None if r is None else r[0], None if r is None else r[1]))
    return write_jsonl(tmp_path / name, rows)


def build(tmp_path, answers, max_failure_share=0.5):
    inputs = tmp_path / "judge_input.jsonl"
    counts = write_judge_inputs(tmp_path / "prompts.jsonl", answers, inputs, template=TEMPLATE,
                                system="You are a helpful assistant.", scale=MT)
    replies = judge(tmp_path, "replies.jsonl", inputs, FIRST)
    write_retry_inputs(inputs, replies, tmp_path / "retry_input.jsonl",
                       retry_prompt="\nReply with the rating only, {min} to {max}.", scale=MT)
    retries = judge(tmp_path, "retries.jsonl", tmp_path / "retry_input.jsonl", RETRY)
    stats = collect_grades(tmp_path / "prompts.jsonl", answers, inputs, replies, retries, tmp_path / "scored.jsonl",
                           tmp_path / "stats.json", names={"weak": "small", "strong": "big"}, scale=MT,
                           structured="explained", max_failure_share=max_failure_share)
    return counts, stats


def test_every_answer_is_graded_or_counted_and_router_data_reads_the_scored_prompts(chain):
    tmp_path, answers = chain
    counts, stats = build(tmp_path, answers)
    inputs = read_jsonl(tmp_path / "judge_input.jsonl")
    assert counts == {"weak": {"answered": 5, "answer_failed": 1}, "strong": {"answered": 6, "answer_failed": 0}}
    assert len(inputs) == 11 and "weak/p5" not in {r["id"] for r in inputs}
    assert inputs[0]["messages"] == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": fill(TEMPLATE, question="question 0", answer="weak answer p0", min=1, max=10)}]
    # retried: exactly the replies without a grade (and the failed request), the retry prompt appended
    retry = {r["id"]: r for r in read_jsonl(tmp_path / "retry_input.jsonl")}
    assert set(retry) == set(RETRY)
    assert retry["weak/p2"]["messages"][-1]["content"].endswith("\nReply with the rating only, 1 to 10.")

    w, s = stats["weak"], stats["strong"]
    for m in (w, s):  # every answer: graded first, graded on retry, or counted without a grade
        assert m["graded_first"] + m["graded_on_retry"] + m["ungraded"] == m["judged"] == m["answered"]
    assert (w["answered"], w["answer_failed"], w["graded_first"], w["graded_on_retry"], w["ungraded"]) == (5, 1, 2, 2, 1)
    assert w["first_without_grade"] == {"no_grade": 1, "ambiguous": 1, "out_of_scale": 1}
    assert w["ungraded_why"] == {"no_grade": 1}
    assert s["first_without_grade"] == {"truncated": 1, "request_failed": 1}
    assert (s["graded_first"], s["graded_on_retry"], s["ungraded"]) == (4, 2, 0)
    # replies that ended on their own outside "explanation without brackets, Rating: [[k]]"
    assert w["outside_constraint"] == 5 and s["outside_constraint"] == 1  # [[2]], Rating: 8, ...
    assert stats["ungraded"] == 1 and stats["failure_share"] == pytest.approx(1 / 11)
    assert w["grades"] == {"1": 1, "2": 1, "3": 1, "4": 1} and s["grades"]["8"] == 2

    scored = read_jsonl(tmp_path / "scored.jsonl")
    assert scored == [  # p4 and p5 have no weak grade: no label, left out and counted
        {"id": "p0", "prompt": "question 0", "scores": {"small": 3, "big": 9}},
        {"id": "p1", "prompt": "question 1", "scores": {"small": 2, "big": 8}},
        {"id": "p2", "prompt": "question 2", "scores": {"small": 1, "big": 8}},
        {"id": "p3", "prompt": "question 3", "scores": {"small": 4, "big": 6}},
    ]
    assert (stats["prompts"], stats["records"], stats["without_weak_grade"]) == (6, 4, 2)
    recs = read_scored([tmp_path / "scored.jsonl"], scores={"weak": "small", "strong": "big", "scale": MT})
    assert [(r["label"], r["weak_score"], r["strong_score"]) for r in recs] == [
        (2, 3.0, 9.0), (1, 2.0, 8.0), (1, 1.0, 8.0), (2, 4.0, 6.0)]


def test_more_answers_without_a_grade_than_the_failure_share_fail_and_write_nothing(chain):
    tmp_path, answers = chain
    with pytest.raises(UserError) as e:
        build(tmp_path, answers, max_failure_share=0.05)
    msg = str(e.value)
    assert "1 of 11 answers got no grade from the judge after one retry" in msg
    assert "router.build_labels.grading.max_failure_share=0.05" in msg and "weak/p4: no_grade" in msg
    assert not (tmp_path / "scored.jsonl").exists() and not (tmp_path / "stats.json").exists()
