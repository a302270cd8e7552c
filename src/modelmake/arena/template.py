"""The classifier's input: judge instruction, prompt, both responses and a verdict cue, within a token budget.

Standalone (standard library only): the export copies this file next to the submission's
``predict.py``, so the submission builds exactly the inputs the model was trained on.

The budget left after the fixed parts (instruction, section headers, verdict cue) is split fairly
between the prompt and the two responses: each gets an equal share, and what a short part does not
need goes to the others (max-min fair, "water filling"). A part longer than its share keeps its head
and its tail (``head_share`` of the share from the start, the rest from the end): the question and
the conclusion of an answer are where a judge looks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

INSTRUCTION = "Judge which response answers the prompt better."
PROMPT_HEADER = "\nPrompt: "
A_HEADER = "\nResponse A: "
B_HEADER = "\nResponse B: "
VERDICT_CUE = "\nBetter response (A or B):"


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


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_input(tokenizer, prompt: str, response_a: str, response_b: str, s: TemplateSettings) -> list[int]:
    """Token ids of one pair, at most ``s.max_length``; the last token is the verdict cue's."""
    fixed = [_ids(tokenizer, t) for t in (INSTRUCTION, PROMPT_HEADER, A_HEADER, B_HEADER, VERDICT_CUE)]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    budget = s.max_length - len(bos) - sum(map(len, fixed))
    if budget < 3:
        raise ValueError(f"max_length={s.max_length} leaves {budget} tokens for the prompt and responses; "
                         f"raise it to at least {s.max_length - budget + 30}")
    parts = [_ids(tokenizer, t) for t in (prompt, response_a, response_b)]
    keep = fair_split([len(p) for p in parts], budget)
    p, a, b = (head_tail(ids, k, s.head_share) for ids, k in zip(parts, keep))
    instr, ph, ah, bh, cue = fixed
    return bos + instr + ph + p + ah + a + bh + b + cue


def settings_dict(s: TemplateSettings) -> dict:
    return asdict(s)
