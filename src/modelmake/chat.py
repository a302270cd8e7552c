"""Conversations: the canonical message shape every pipeline reads, and assistant-only loss masks
for any chat template.

**The canonical conversation** (what :mod:`modelmake.reformat` writes, the pseudo-label shards,
generation and merge carry, and distillation, self-play and the demo assets read) is the OpenAI
chat format, in four roles:

* ``system``: only as the first message (a record's top-level ``system`` field becomes it);
* ``user``;
* ``assistant``: ``content`` (a string, ``""`` when empty), and ``tool_calls`` when the turn calls
  tools: ``[{id, type: "function", function: {name, arguments}}]`` with ``arguments`` a JSON object
  encoded as a string (the OpenAI format; ShareGPT's ``function_call`` turns become this);
* ``tool``: a tool's output (ShareGPT's ``observation``, OpenAI's ``tool`` and legacy ``function``),
  with ``tool_call_id`` naming the call it answers.

Any message may carry ``name``. In parquet a conversation is :func:`messages_type` (a field that is
not set is null); :func:`plain_messages` gives the OpenAI form (only the fields that are set, plain
Python: what goes to a chat endpoint), :func:`template_messages` the form transformers' chat
templates want (each call's ``arguments`` a dict), :func:`read_conversations` a parquet's rows.

**Assistant-only loss masks.** ``assistant_mask(tokenizer, messages)`` tokenizes a conversation with the tokenizer's chat template
and marks the tokens a model is trained on: each assistant turn's content and its end-of-turn
token (``<|eot_id|>``, ``<|im_end|>``, ``<end_of_turn>``, ``</s>``), nothing of system, user or
tool turns (a tool's output is never trained on; an assistant turn that calls a tool is), nor the
template's role headers.

* A template with ``{% generation %}`` markers: transformers' ``return_assistant_tokens_mask``.
* Any other template (the Llama-3.x, Qwen2.5, Gemma-2 and Mistral ones): rendered prefix by prefix.
  For assistant turn i, ``messages[:i]`` with the generation prompt is the prompt the model sees at
  inference; ``messages[:i + 1]`` adds the answer. The span is what the second adds beyond the
  first, up to and including the end-of-turn token, without the whitespace the template appends
  for the next turn. The span holds only if the whole conversation's rendering starts with both
  (text), and its tokenization starts with the prompt's own tokens (tokens: what the model is
  trained on is what it sees at inference). Characters map to tokens by the fast tokenizer's
  offsets. A template that renders earlier turns differently once later ones follow (past
  reasoning dropped, a system prompt that moves) is refused with ``ChatTemplateError``: such a
  template needs ``{% generation %}`` markers.

A conversation that ends on a user turn has an all-zero mask: the caller decides what that means.
A template that refuses a system role (Gemma-2) is reported, or with ``fold_system=True`` the
system message is folded into the first user turn.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from modelmake.errors import UserError

GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")
FIX = ("add {% generation %} ... {% endgeneration %} around each assistant turn's content and its end-of-turn token "
       "in the chat template, or use a template that renders earlier turns the same whatever follows them")


class ChatTemplateError(UserError):
    """A chat template that cannot render a conversation, or from which no assistant mask follows."""


# --- the canonical conversation -----------------------------------------------------------------

ROLES = ("system", "user", "assistant", "tool")
MESSAGE_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id")


def messages_type():
    """The arrow type of a conversation column (reformatted, pseudo-labelled): a list of messages
    ``{role, content, name, tool_calls: [{id, type, function: {name, arguments}}], tool_call_id}``."""
    import pyarrow as pa

    call = pa.struct([("id", pa.string()), ("type", pa.string()),
                      ("function", pa.struct([("name", pa.string()), ("arguments", pa.string())]))])
    return pa.list_(pa.struct([("role", pa.string()), ("content", pa.string()), ("name", pa.string()),
                               ("tool_calls", pa.list_(call)), ("tool_call_id", pa.string())]))


def _plain(value: Any) -> Any:
    """Plain Python: dicts without None values, lists (not numpy arrays, as pandas gives them)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ndarray":
        return [_plain(v) for v in value]
    return value


def plain_messages(messages) -> list[dict]:
    """The conversation in the OpenAI chat format: each message with only the fields that are set
    (a table's nulls and an empty ``tool_calls`` dropped), as plain Python values."""
    out = []
    for m in messages:
        m = _plain(dict(m))
        if not m.get("tool_calls", True):
            del m["tool_calls"]
        out.append(m)
    return out


def template_messages(messages) -> list[dict]:
    """:func:`plain_messages` with each tool call's ``arguments`` decoded to a dict, as transformers'
    chat templates expect them (vLLM decodes them the same way); an undecodable one stays a string."""
    out = plain_messages(messages)
    for m in out:
        for call in m.get("tool_calls", []):
            fn = call.get("function", {})
            if isinstance(fn.get("arguments"), str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"])
                except json.JSONDecodeError:
                    pass
    return out


def is_tool_call(message: dict) -> bool:
    """Whether a message is an assistant turn that calls tools."""
    calls = message.get("tool_calls")
    return message.get("role") == "assistant" and calls is not None and len(calls) > 0


def read_conversations(parquet: str | Path) -> list[tuple[str, list[dict]]]:
    """``(id, plain messages)`` of every row of a conversation parquet (reformatted or
    pseudo-labelled), in order."""
    import pyarrow.parquet as pq

    table = pq.read_table(parquet, columns=["id", "messages"])
    return [(str(rid), plain_messages(ms)) for rid, ms in zip(table.column("id").to_pylist(),
                                                               table.column("messages").to_pylist())]


# --- assistant-only loss masks ------------------------------------------------------------------


def has_generation_markers(template: str | dict | None) -> bool:
    """Whether a chat template (a named-templates dict: its ``default``) has ``{% generation %}``."""
    if isinstance(template, dict):
        template = template.get("default")
    return bool(template) and GENERATION_RE.search(template) is not None


def fold_system_message(messages: list[dict]) -> list[dict]:
    """The conversation with a leading system message folded into the first user turn
    (``system + "\\n\\n" + user``), for templates without a system role; unchanged without one."""
    if not messages or messages[0].get("role") != "system":
        return list(messages)
    system, rest = messages[0], list(messages[1:])
    if rest and rest[0].get("role") == "user":
        rest[0] = {**rest[0], "content": f"{system['content']}\n\n{rest[0]['content']}"}
        return rest
    return [{"role": "user", "content": system["content"]}, *rest]


def template_name(tokenizer: Any) -> str:
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return f"the chat template of {name}"


def render(tokenizer: Any, messages: list[dict], *, add_generation_prompt: bool, **kwargs: Any) -> str:
    """The template's text for the messages; a template's own refusal becomes a ChatTemplateError."""
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **kwargs)
    except TemplateError as e:
        hint = ("; the template has no system role: fold the system message into the first user turn "
                "(assistant_mask(..., fold_system=True)) or use a model whose template has one"
                if messages and messages[0].get("role") == "system" and "system" in str(e).lower() else "")
        raise ChatTemplateError(f"{template_name(tokenizer)} refuses the conversation: {e}{hint}") from e


def assistant_mask(tokenizer: Any, messages: list[dict], *, fold_system: bool = False,
                   **kwargs: Any) -> tuple[list[int], list[int]]:
    """(input_ids, mask) of the conversation through the chat template: mask 1 on each assistant
    turn's tokens including its end-of-turn token, 0 elsewhere. ``input_ids`` are those of
    ``apply_chat_template(messages, tokenize=True)``. ``messages`` in the canonical shape (any form:
    a table's nulls are dropped, tool calls' arguments decoded, :func:`template_messages`); tool
    outputs are not masked, tool-calling assistant turns are. ``kwargs`` go to the template
    (``tools``, ``chat_template``, ...). Raises ChatTemplateError where no trustworthy mask follows."""
    messages = template_messages(messages)
    if fold_system:
        messages = fold_system_message(messages)
    if not getattr(tokenizer, "chat_template", None) and not kwargs.get("chat_template"):
        raise ChatTemplateError(f"{template_name(tokenizer)}: the tokenizer has no chat template")
    if has_generation_markers(tokenizer.get_chat_template(kwargs.get("chat_template"), kwargs.get("tools"))):
        return _marked_mask(tokenizer, messages, **kwargs)
    return _prefix_mask(tokenizer, messages, **kwargs)


def _marked_mask(tokenizer: Any, messages: list[dict], **kwargs: Any) -> tuple[list[int], list[int]]:
    from jinja2.exceptions import TemplateError

    try:
        enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True, **kwargs)
    except TemplateError:
        render(tokenizer, messages, add_generation_prompt=False, **kwargs)  # raises the clear error
        raise
    return list(enc["input_ids"]), [int(m) for m in enc["assistant_masks"]]


def _prefix_mask(tokenizer: Any, messages: list[dict], **kwargs: Any) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "is_fast", False):
        raise ChatTemplateError(f"{template_name(tokenizer)}: masks without {{% generation %}} markers need a fast "
                                "tokenizer (character offsets); " + FIX)
    full = render(tokenizer, messages, add_generation_prompt=False, **kwargs)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    mask = [0] * len(ids)
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    for k, i in enumerate(turns, 1):
        where = f"assistant turn {k} of {len(turns)} (message {i})"
        if i == 0:
            raise ChatTemplateError(f"{template_name(tokenizer)}: {where} opens the conversation, so no prompt "
                                    "precedes it to derive its span from; start with a user turn or " + FIX)
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True, **kwargs)
        upto = render(tokenizer, messages[:i + 1], add_generation_prompt=False, **kwargs)
        if not upto.startswith(prompt):
            raise ChatTemplateError(
                f"{template_name(tokenizer)} does not render conversations prefix by prefix: the prompt before "
                f"{where} (with the generation prompt) is not the start of the same conversation with that answer; "
                + FIX)
        if not full.startswith(upto):
            raise ChatTemplateError(
                f"{template_name(tokenizer)} does not render conversations prefix by prefix: {where} renders "
                "differently once later turns follow (a template that drops past reasoning or moves the system "
                "prompt does this); " + FIX)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if ids[:len(prompt_ids)] != list(prompt_ids):
            raise ChatTemplateError(
                f"{template_name(tokenizer)}: the prompt before {where} tokenizes differently on its own than "
                "inside the conversation (a token crosses the boundary between prompt and answer), so the model "
                "would train on tokens it never sees at inference; end the generation prompt on a special token "
                "or whitespace the tokenizer splits, or " + FIX)
        start, end = len(prompt), len(upto.rstrip())
        span = [t for t, (a, b) in enumerate(offsets) if a < end and b > start and b > a]
        if not span:
            raise ChatTemplateError(f"{template_name(tokenizer)} renders nothing for {where}; " + FIX)
        if span[0] < len(prompt_ids):
            raise ChatTemplateError(f"{template_name(tokenizer)}: {where} starts inside a prompt token; " + FIX)
        for t in span:
            mask[t] = 1
    return ids, mask


def masked_spans(ids: list[int], mask: list[int]) -> list[list[int]]:
    """The runs of consecutive masked ids, in order: one per assistant turn for a well-formed mask."""
    spans, run = [], []
    for t, m in zip(ids, mask):
        if m:
            run.append(t)
        elif run:
            spans.append(run)
            run = []
    return spans + ([run] if run else [])


def is_special(tokenizer: Any, token_id: int) -> bool:
    """Whether the id is one of the tokenizer's special tokens (named or added as special, such as
    Llama-3's ``<|eot_id|>`` that is not its ``eos_token``)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}).get(token_id)
    return token_id in tokenizer.all_special_ids or bool(added is not None and added.special)
