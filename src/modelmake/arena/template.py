"""The classifier's input: judge instruction, the conversation turn by turn (prompt, response A,
response B), a verdict cue, within a token budget.

Standalone (standard library only): the export copies this file next to the submission's
``predict.py``, so the submission builds exactly the inputs the model was trained on.

A pair has one turn or several: each of prompt, response_a and response_b is a string (one turn) or a
list of strings (one per turn, ``None`` read as ""), or all three are JSON-encoded lists of the same
length (Kaggle LMSYS: ``'["Hi", "And then?"]'``; see :func:`pair_turns`). A turn is rendered as
``Prompt: ... Response A: ... Response B: ...``; a one-turn pair is exactly the single-turn template.

The budget left after the fixed parts (instruction, every turn's section headers, verdict cue) is
split fairly between all parts of all turns: each gets an equal share, and what a short part does not
need goes to the others (max-min fair, "water filling"). A part longer than its share keeps its head
and its tail (``head_share`` of the share from the start, the rest from the end): the question and
the conclusion of an answer are where a judge looks. When there are too many turns for every part to
keep ``MIN_PART_TOKENS`` (or all of itself, when shorter), whole turns are left out, the same way:
the first ``head_share`` of the turns that fit and the last ones are kept.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

INSTRUCTION = "Judge which response answers the prompt better."
PROMPT_HEADER = "\nPrompt: "
A_HEADER = "\nResponse A: "
B_HEADER = "\nResponse B: "
VERDICT_CUE = "\nBetter response (A or B):"
MIN_PART_TOKENS = 8  # a turn is kept only while each of its parts can keep this many (or all it has)


@dataclass(frozen=True)
class TemplateSettings:
    max_length: int = 256  # tokens, special tokens included
    head_share: float = 0.5  # of a truncated part's share, kept from its start


def fair_split(lengths: list[int], budget: int) -> list[int]:
    """How many tokens each part may keep: max-min fair shares of ``budget`` (sum <= budget).

    A part shorter than an equal share keeps all of it; the rest is shared equally among the longer
    parts; an indivisible remainder goes to the earlier parts.
    """
    if budget < 0:
        raise ValueError(f"negative budget {budget}")
    alloc = [0] * len(lengths)
    left = budget
    open_ = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    while open_:
        share = left // len(open_)
        i = open_[0]
        if lengths[i] <= share:
            alloc[i] = lengths[i]
            left -= lengths[i]
            open_.pop(0)
            continue
        # every remaining part wants more than an equal share: split what is left
        rest = left - share * len(open_)
        for k, j in enumerate(sorted(open_)):
            alloc[j] = share + (1 if k < rest else 0)
        break
    return alloc


def head_tail(ids: list[int], keep: int, head_share: float) -> list[int]:
    """The first and last tokens of ``ids``, ``keep`` in all (all of it when it fits)."""
    if len(ids) <= keep:
        return list(ids)
    if keep <= 0:
        return []
    head = min(keep, max(0, round(keep * head_share)))
    tail = keep - head
    return list(ids[:head]) + (list(ids[-tail:]) if tail else [])


def as_turns(value) -> list[str]:
    """A part's turns: a string is one turn; a list (or any sequence: parquet gives arrays) is one turn
    per item, ``None`` read as ""."""
    if isinstance(value, str):
        return [value]
    if value is None:
        raise ValueError("a pair part is None; give a string or a list of strings")
    out = []
    for i, t in enumerate(value):
        if t is not None and not isinstance(t, str):
            raise ValueError(f"turn {i} is {type(t).__name__}, not a string")
        out.append(t or "")
    return out


def json_turns(text: str) -> list | None:
    """The list a JSON-encoded list of strings (or nulls) holds, or None when ``text`` is not one."""
    t = text.strip()
    if not (t.startswith("[") and t.endswith("]")):
        return None
    try:
        value = json.loads(t)
    except ValueError:
        return None
    if isinstance(value, list) and all(v is None or isinstance(v, str) for v in value):
        return value
    return None


def pair_turns(prompt, response_a, response_b) -> list[tuple[str, str, str]]:
    """The pair as turns ``(prompt, response A, response B)``.

    Strings are one turn each, unless all three are JSON-encoded lists of strings (Kaggle LMSYS),
    which are decoded (a plain prompt that merely looks like a list is left alone unless both
    responses do too). Lists must have one item per turn in all three parts; raises ValueError.
    """
    parts = [prompt, response_a, response_b]
    if all(isinstance(x, str) for x in parts):
        decoded = [json_turns(x) for x in parts]
        if all(d is not None for d in decoded):
            parts = decoded
    turns = [as_turns(x) for x in parts]
    if len({len(t) for t in turns}) != 1:
        raise ValueError(f"the prompt has {len(turns[0])} turns, response_a {len(turns[1])} and response_b "
                         f"{len(turns[2])}; each needs one item per turn")
    if not turns[0]:
        raise ValueError("the pair has no turns (empty lists)")
    return list(zip(*turns))


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _turns_that_fit(lengths: list[list[int]], header: int, budget: int, head_share: float) -> list[int]:
    """Indices of the turns kept: all when each part can keep min(its length, MIN_PART_TOKENS) within
    ``budget`` (``header`` tokens per turn), else as many as can, the first and last ones."""
    for k in range(len(lengths), 0, -1):
        kept = head_tail(list(range(len(lengths))), k, head_share)
        if sum(header + sum(min(n, MIN_PART_TOKENS) for n in lengths[i]) for i in kept) <= budget:
            return kept
    return head_tail(list(range(len(lengths))), 1, head_share)


def build_input(tokenizer, prompt, response_a, response_b, s: TemplateSettings) -> list[int]:
    """Token ids of one pair (one turn or several, see :func:`pair_turns`), at most ``s.max_length``;
    the last token is the verdict cue's."""
    instr, ph, ah, bh, cue = (_ids(tokenizer, t) for t in (INSTRUCTION, PROMPT_HEADER, A_HEADER, B_HEADER, VERDICT_CUE))
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    header = len(ph) + len(ah) + len(bh)
    budget = s.max_length - len(bos) - len(instr) - len(cue)
    if budget - header < 3:
        raise ValueError(f"max_length={s.max_length} leaves {budget - header} tokens for the prompt and responses; "
                         f"raise it to at least {s.max_length - budget + header + 30}")
    turns = [[_ids(tokenizer, t) for t in turn] for turn in pair_turns(prompt, response_a, response_b)]
    kept = _turns_that_fit([[len(p) for p in t] for t in turns], header, budget, s.head_share)
    parts = [p for i in kept for p in turns[i]]
    keep = fair_split([len(p) for p in parts], budget - header * len(kept))
    parts = [head_tail(ids, k, s.head_share) for ids, k in zip(parts, keep)]
    out = bos + instr
    for i in range(len(kept)):
        p, a, b = parts[3 * i: 3 * i + 3]
        out += ph + p + ah + a + bh + b
    return out + cue


def settings_dict(s: TemplateSettings) -> dict:
    return asdict(s)
