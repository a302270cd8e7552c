"""The router's vocabulary and conversation format.

The router answers with exactly one of five special tokens, ``[[1]]`` .. ``[[5]]``, the score an
expert judge would give the weak model's answer. A conversation is the original recipe's:

* system: the instruction (kept with the model, in ``router.json``, so scoring uses the same one);
* user: ``"[Question]\\n<prompt>\\n\\nPrediction:\\n"``;
* assistant: ``"[[k]]"``, followed by the chat template's end-of-turn token (a special token, the
  tokenizer's EOS or not: ``<|eot_id|>``, ``<|im_end|>``).
"""

from __future__ import annotations

import re
from typing import Any

LABEL_TOKENS = [f"[[{k}]]" for k in range(1, 6)]
LABEL_RE = re.compile(r"^\[\[([1-5])\]\]$")
ROUTER_JSON = "router.json"  # in a router model folder: system instruction and label tokens


def user_message(prompt: str) -> str:
    return f"[Question]\n{prompt}\n\nPrediction:\n"


def prompt_messages(prompt: str, system: str) -> list[dict[str, str]]:
    """The conversation the router scores: system instruction and question, no answer yet."""
    return [{"role": "system", "content": system}, {"role": "user", "content": user_message(prompt)}]


def label_of(answer: str) -> int | None:
    """1..5 for an answer that is exactly one label token, else None."""
    m = LABEL_RE.match(answer.strip())
    return int(m.group(1)) if m else None


def add_label_tokens(tokenizer: Any, model: Any = None) -> list[int]:
    """Add ``[[1]]``..``[[5]]`` as special tokens (once) and resize the model's embeddings to the
    tokenizer; return the five token ids, in score order."""
    missing = [t for t in LABEL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if model is not None and model.get_input_embeddings().weight.shape[0] != len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return label_token_ids(tokenizer)


def label_token_ids(tokenizer: Any) -> list[int]:
    ids = []
    for t in LABEL_TOKENS:
        enc = tokenizer.encode(t, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(f"{t!r} is not one token in this tokenizer ({enc}); add the label tokens first")
        ids.append(enc[0])
    return ids
