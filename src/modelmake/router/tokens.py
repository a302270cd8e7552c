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

# The source document's instruction: the system turn of a record that comes without messages (only a
# prompt and scores) when no record carries messages and router.system is not set.
SOURCE_SYSTEM = (
    "[Instruction]\nBased on the question provided below, predict the score an expert evaluator would give "
    "to an AI assistant's response, considering its helpfulness, relevance, adherence to facts, depth, creativity, "
    "and detail. Your prediction should infer the level of proficiency needed to address the question effectively. "
    "Use a scale from 1 to 5, where a higher score indicates a higher anticipated quality of response. Provide your "
    "prediction as: \"[[predicted rating]]\".\n\n"
    "Score criteria:\n"
    "- **4-5**: The AI assistant can produce a very strong answer, showing deep understanding, creativity, detailed "
    "insight, and high relevance.\n"
    "- **3**: The AI assistant can provide an adequate answer with moderate detail, relevance, and factual accuracy.\n"
    "- **1-2**: The AI assistant will struggle to produce a strong answer due to the question's difficulty, vagueness, or "
    "the assistant's limitations.\n"
)


def user_message(prompt: str) -> str:
    return f"[Question]\n{prompt}\n\nPrediction:\n"


def prompt_messages(prompt: str, system: str) -> list[dict[str, str]]:
    """The conversation the router scores: system instruction and question, no answer yet."""
    return [{"role": "system", "content": system}, {"role": "user", "content": user_message(prompt)}]


def conversation(prompt: str, system: str, label: int) -> list[dict[str, str]]:
    """The training conversation of a prompt whose label is known: system, question, ``[[label]]``."""
    return prompt_messages(prompt, system) + [{"role": "assistant", "content": LABEL_TOKENS[label - 1]}]


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
