"""Assistant-only loss masks for real chat templates (``modelmake.chat``), and the router and
distillation data built with them (seconds, plus a few router SFT steps on a tiny model).

The templates are written in the shapes of Llama-3.1, Qwen2.5, Gemma-2 and Mistral (v0.3) and put
on the demo tokenizer (BPE on the demo chats) with the special tokens each needs; none has
``{% generation %}`` markers.
"""

from __future__ import annotations

import json

import pytest

from conftest import REPO
from modelmake.chat import ChatTemplateError, assistant_mask, has_generation_markers, masked_spans

LLAMA3 = (  # Llama-3.1-Instruct, without tools: the system header always, dated
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

QWEN25 = (  # Qwen2.5-Instruct, without tools: ChatML with a default system prompt
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

GEMMA2 = (  # Gemma-2-it: no system role, `model` turns
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

MISTRAL = (  # Mistral-7B-Instruct-v0.3, without tools: the system prompt goes into the last user turn
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content']|trim + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception of an "
    "initial optional system message!') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

# a reasoning template (Qwen3 / DeepSeek-R1 shape): past assistant turns lose their reasoning, so a
# turn renders differently once a later turn follows
REASONING = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content %}"
    "{%- if not loop.last %}{%- set content = content.split('</think>')[-1] | trim %}{%- endif %}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# name: (template, special tokens, eos token, the expected masked text of an assistant turn)
TEMPLATES = {
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|eot_id|>", lambda c: c + "<|eot_id|>"),
    "qwen2.5": (QWEN25, ["<|im_start|>", "<|im_end|>", "<|endoftext|>"], "<|im_end|>", lambda c: c + "<|im_end|>"),
    "gemma2": (GEMMA2, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<eos>",
               lambda c: c + "<end_of_turn>"),
    "mistral": (MISTRAL, ["<s>", "</s>", "[INST]", "[/INST]"], "</s>", lambda c: " " + c + "</s>"),
}
BOS = {"llama3": "<|begin_of_text|>", "qwen2.5": None, "gemma2": "<bos>", "mistral": "<s>"}

CONVERSATION = [
    {"role": "user", "content": "I am curious about maps. Where do I start?"},
    {"role": "assistant", "content": "A map shows places and distances at a fixed scale."},
    {"role": "user", "content": "Thanks! Any tip for a beginner?"},
    {"role": "assistant", "content": "A good tip: start small and be patient."},
    {"role": "user", "content": "Why does that matter?"},
    {"role": "assistant", "content": "It matters because practice builds skill."},
]
SYSTEM = {"role": "system", "content": "You answer in one sentence."}


@pytest.fixture(scope="module")
def demo_tok_dir(tmp_path_factory):
    """The demo tokenizer: BPE on the demo chats, the project's (marked) Llama-3 style template."""
    import pandas as pd

    from modelmake.assets import build_tokenizer

    d = tmp_path_factory.mktemp("chat_tok")
    msgs = []
    for line in (REPO / "resources/demo/chat_en.jsonl").read_text().splitlines():
        turns = json.loads(line)["data"]
        msgs.append([{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)])
    pd.DataFrame({"messages": msgs}).to_parquet(d / "chat.parquet")
    build_tokenizer([d / "chat.parquet"], d / "tok", vocab_size=500)
    return d / "tok"


def tokenizer_for(tok_dir, name: str):
    """The demo tokenizer with a real model's template shape, its special tokens, BOS and EOS."""
    from transformers import AutoTokenizer

    template, specials, eos, _ = TEMPLATES[name]
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.add_special_tokens({"additional_special_tokens": specials}, replace_extra_special_tokens=False)
    tok.add_special_tokens({"eos_token": eos, **({"bos_token": BOS[name]} if BOS[name] else {})})
    tok.chat_template = template
    return tok


def masked_texts(tok, ids, mask) -> list[str]:
    return [tok.decode(span) for span in masked_spans(ids, mask)]


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_masks_cover_exactly_each_assistant_turn_and_its_end_token(demo_tok_dir, name):
    tok = tokenizer_for(demo_tok_dir, name)
    expected = TEMPLATES[name][3]
    ids, mask = assistant_mask(tok, CONVERSATION)
    assert ids == tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert len(mask) == len(ids)
    assert masked_texts(tok, ids, mask) == [expected(m["content"]) for m in CONVERSATION if m["role"] == "assistant"]
    unmasked = tok.decode([t for t, m in zip(ids, mask) if not m])
    for m in CONVERSATION:
        if m["role"] == "user":
            assert m["content"] in unmasked
    assert "A map shows" not in unmasked and "practice builds" not in unmasked


@pytest.mark.parametrize("name", ["llama3", "qwen2.5"])
def test_system_turns_are_never_masked(demo_tok_dir, name):
    tok = tokenizer_for(demo_tok_dir, name)
    ids, mask = assistant_mask(tok, [SYSTEM, *CONVERSATION[:4]])
    assert masked_texts(tok, ids, mask) == [TEMPLATES[name][3](m["content"]) for m in CONVERSATION[1:4:2]]
    assert "one sentence" in tok.decode(ids) and "one sentence" not in tok.decode([t for t, m in zip(ids, mask) if m])


def test_a_system_prompt_that_moves_is_refused(demo_tok_dir):
    """Mistral v0.3 puts the system prompt into the last user turn: a prompt's rendering is not
    the start of its conversation's."""
    tok = tokenizer_for(demo_tok_dir, "mistral")
    with pytest.raises(ChatTemplateError, match="prefix by prefix.*assistant turn 1 of 1.*{% generation %}"):
        assistant_mask(tok, [SYSTEM, *CONVERSATION[:2]])


def test_qwen_default_system_prompt_is_rendered_and_not_trained_on(demo_tok_dir):
    tok = tokenizer_for(demo_tok_dir, "qwen2.5")
    ids, mask = assistant_mask(tok, CONVERSATION[:4])
    assert tok.decode(ids).startswith("<|im_start|>system\nYou are Qwen")
    assert not any(mask[:len(tok("<|im_start|>system\nYou are Qwen", add_special_tokens=False)["input_ids"])])
    assert len(masked_spans(ids, mask)) == 2


def test_gemma_refuses_a_system_role_clearly_unless_folding_is_asked_for(demo_tok_dir):
    tok = tokenizer_for(demo_tok_dir, "gemma2")
    conv = [SYSTEM, *CONVERSATION[:2]]
    with pytest.raises(ChatTemplateError, match="System role not supported.*fold_system=True"):
        assistant_mask(tok, conv)
    ids, mask = assistant_mask(tok, conv, fold_system=True)
    assert "<start_of_turn>user\nYou answer in one sentence.\n\nI am curious" in tok.decode(ids)
    assert masked_texts(tok, ids, mask) == [CONVERSATION[1]["content"] + "<end_of_turn>"]


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_a_conversation_ending_on_a_user_turn_has_an_empty_mask(demo_tok_dir, name):
    tok = tokenizer_for(demo_tok_dir, name)
    ids, mask = assistant_mask(tok, CONVERSATION[:1])
    assert ids and not any(mask)
    ids, mask = assistant_mask(tok, CONVERSATION[:3])  # one answer, then an unanswered question
    assert len(masked_spans(ids, mask)) == 1


def test_the_demo_template_gives_the_same_mask_with_and_without_generation_markers(demo_tok_dir):
    from transformers import AutoTokenizer

    marked = AutoTokenizer.from_pretrained(demo_tok_dir)
    assert "{% generation %}" in marked.chat_template
    plain = AutoTokenizer.from_pretrained(demo_tok_dir)
    plain.chat_template = marked.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    for conv in (CONVERSATION, CONVERSATION[:2], [SYSTEM, *CONVERSATION[:4]], CONVERSATION[:3]):
        assert assistant_mask(marked, conv) == assistant_mask(plain, conv)
    ids, mask = assistant_mask(plain, CONVERSATION)
    assert masked_texts(plain, ids, mask) == [m["content"] + "<|eot_id|>" for m in CONVERSATION[1::2]]


def test_a_template_that_rewrites_past_turns_is_refused_naming_the_fix(demo_tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_tok_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]},
                           replace_extra_special_tokens=False)
    tok.chat_template = REASONING
    conv = [CONVERSATION[0], {"role": "assistant", "content": "<think>maps first</think> A map shows places."},
            *CONVERSATION[2:4]]
    with pytest.raises(ChatTemplateError) as e:
        assistant_mask(tok, conv)
    message = str(e.value)
    assert "prefix by prefix" in message and "assistant turn 1 of 2" in message
    assert "{% generation %}" in message and str(demo_tok_dir) in message
    assert assistant_mask(tok, conv[:2])[1].count(1) > 0  # one turn: nothing follows it, nothing to rewrite


def test_a_prompt_that_tokenizes_differently_alone_is_refused(demo_tok_dir):
    """A prompt ending on a space ("A: ") that the answer's first word takes in the conversation
    ("A: A map" is "A", ":", " A", " map"): the model would train on tokens it never sees at inference."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_tok_dir)
    tok.chat_template = ("{% for m in messages %}{% if m.role == 'user' %}{{ 'Q: ' + m.content + '\\nA: ' }}"
                         "{% else %}{{ m.content + eos_token + '\\n' }}{% endif %}{% endfor %}")
    with pytest.raises(ChatTemplateError, match="tokenizes differently"):
        assistant_mask(tok, CONVERSATION[:2])


# --- tool turns: tool calls are trained on, tool outputs are not


LLAMA31_TOOLS = (  # Llama-3.1-Instruct's handling of tool calls and ipython/tool turns (custom tools)
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- elif 'tool_calls' in message %}"
    "{%- if not message.tool_calls|length == 1 %}"
    "{{- raise_exception('This model only supports single tool-calls at once!') }}{%- endif %}"
    "{%- set tool_call = message.tool_calls[0].function %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{{- '{\"name\": \"' + tool_call.name + '\", ' }}{{- '\"parameters\": ' }}{{- tool_call.arguments | tojson }}"
    "{{- '}' }}{{- '<|eot_id|>' }}"
    "{%- elif message.role == 'tool' or message.role == 'ipython' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}"
    "{%- if message.content is mapping %}{{- message.content | tojson }}{%- else %}{{- message.content }}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

QWEN25_TOOLS = (  # Qwen2.5-Instruct's messages loop: tool calls in <tool_call>, outputs grouped in a user turn
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

WEATHER_CALL = {"id": "call_0", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOL_CONVERSATION = [  # as a reformatted parquet holds it: every field, null where a message has none
    {"role": "system", "content": "You can call get_weather.", "name": None, "tool_calls": None, "tool_call_id": None},
    {"role": "user", "content": "Weather in Paris?", "name": "alice", "tool_calls": None, "tool_call_id": None},
    {"role": "assistant", "content": "", "name": None, "tool_calls": [WEATHER_CALL], "tool_call_id": None},
    {"role": "tool", "content": "sunny and 21 degrees", "name": None, "tool_calls": None, "tool_call_id": "call_0"},
    {"role": "assistant", "content": "It is 21 degrees.", "name": None, "tool_calls": None, "tool_call_id": None},
]

# name: (template, special tokens, eos token, masked text of the tool-call turn and of the answer)
TOOL_TEMPLATES = {
    "demo": (None, [], None, ['<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|eot_id|>',
                              "It is 21 degrees.<|eot_id|>"]),
    "llama3.1": (LLAMA31_TOOLS, TEMPLATES["llama3"][1], "<|eot_id|>",
                 ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', "It is 21 degrees.<|eot_id|>"]),
    "qwen2.5": (QWEN25_TOOLS, TEMPLATES["qwen2.5"][1], "<|im_end|>",
                ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
                 "It is 21 degrees.<|im_end|>"]),
}


def tool_tokenizer(tok_dir, name: str):
    from transformers import AutoTokenizer

    template, specials, eos, _ = TOOL_TEMPLATES[name]
    tok = AutoTokenizer.from_pretrained(tok_dir)
    if template is not None:
        tok.add_special_tokens({"additional_special_tokens": specials}, replace_extra_special_tokens=False)
        tok.add_special_tokens({"eos_token": eos})
        tok.chat_template = template
    return tok


@pytest.mark.parametrize("name", list(TOOL_TEMPLATES))
def test_tool_calls_are_trained_on_and_tool_outputs_are_not(demo_tok_dir, name):
    """Each template renders the call with its arguments as an object (decoded from the OpenAI JSON
    text) and the parquet's nulls dropped (Llama-3.1 tests `'tool_calls' in message`)."""
    tok = tool_tokenizer(demo_tok_dir, name)
    ids, mask = assistant_mask(tok, TOOL_CONVERSATION)
    assert masked_texts(tok, ids, mask) == TOOL_TEMPLATES[name][3]
    assert "sunny and 21 degrees" in tok.decode(ids)
    assert "sunny" not in tok.decode([t for t, m in zip(ids, mask) if m])


def test_the_demo_template_masks_tool_turns_the_same_with_and_without_generation_markers(demo_tok_dir):
    from transformers import AutoTokenizer

    marked = AutoTokenizer.from_pretrained(demo_tok_dir)
    plain = AutoTokenizer.from_pretrained(demo_tok_dir)
    plain.chat_template = marked.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    for conv in (TOOL_CONVERSATION, TOOL_CONVERSATION[:4], TOOL_CONVERSATION[:3]):
        assert assistant_mask(marked, conv) == assistant_mask(plain, conv)


# --- router and distillation with templates without markers


@pytest.fixture(scope="module")
def llama_base(demo_tok_dir, tmp_path_factory):
    """A tiny random Llama with the demo tokenizer under the Llama-3.1 shaped template (no
    markers), its EOS <|end_of_text|> as in the base Llama-3 models: not the end-of-turn token."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer_for(demo_tok_dir, "llama3")
    tok.add_special_tokens({"eos_token": "<|end_of_text|>"})
    assert not has_generation_markers(tok.chat_template)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("llama_base") / "model"
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def router_conversation(prompt: str, k: int) -> list[dict]:
    from modelmake.router.tokens import prompt_messages

    return prompt_messages(prompt, "[Instruction]\nPredict the score.") + [{"role": "assistant", "content": f"[[{k}]]"}]


def test_router_examples_train_on_the_label_and_end_of_turn_only(llama_base, tmp_path):
    """TRL's batches from the router's tokenized examples: labels are [[k]] then <|eot_id|>, the
    template's end of turn, though the tokenizer's EOS is <|end_of_text|>."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from modelmake.router.tokens import add_label_tokens
    from modelmake.router.train import sft_dataset

    tok = AutoTokenizer.from_pretrained(llama_base)
    model = AutoModelForCausalLM.from_pretrained(llama_base)
    ids = add_label_tokens(tok, model)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert tok.eos_token == "<|end_of_text|>"
    ds = sft_dataset(tok, [router_conversation("Prove that there are infinitely many primes.", 2),
                           router_conversation("Hi there!", 5)], max_length=256)
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_length=256, report_to=[], use_cpu=True,
                     per_device_train_batch_size=2)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    for row, k in enumerate([2, 5]):
        labels = batch["labels"][row]
        assert labels[labels != -100].tolist() == [ids[k - 1], eot]
        seq = batch["input_ids"][row][batch["attention_mask"][row] == 1].tolist()
        assert seq[-2:] == [ids[k - 1], eot]
        assert "[Question]" in tok.decode(seq) and "Predict the score" in tok.decode(seq)


def test_router_refuses_an_answer_without_an_end_of_turn_token_or_too_long(llama_base):
    from transformers import AutoTokenizer

    from modelmake.errors import UserError
    from modelmake.router.tokens import add_label_tokens
    from modelmake.router.train import sft_dataset

    tok = AutoTokenizer.from_pretrained(llama_base)
    add_label_tokens(tok)
    tok.chat_template = tok.chat_template.replace(" + message['content'] | trim + '<|eot_id|>'",
                                                  " + message['content'] | trim + ' end'")
    with pytest.raises(UserError, match=r"example 0: the chat template renders the answer as .*end-of-turn"):
        sft_dataset(tok, [router_conversation("q", 3)], max_length=256, name="train.parquet")
    tok = AutoTokenizer.from_pretrained(llama_base)
    add_label_tokens(tok)
    with pytest.raises(UserError, match="longer than 16 tokens"):
        sft_dataset(tok, [router_conversation("q " * 50, 3)], max_length=16)


def test_router_trains_a_few_steps_with_a_template_without_markers(llama_base, tmp_path):
    import pandas as pd

    from modelmake.router.train import train_router

    system = "[Instruction]\nPredict the score."
    convs = [router_conversation(f"Question number {i} about maps?", 1 + i % 5) for i in range(8)]
    for name, rows in (("train", convs[:6]), ("eval", convs[6:])):
        pd.DataFrame({"messages": rows, "system": [system] * len(rows)}).to_parquet(tmp_path / f"{name}.parquet")
    settings = {"epochs": 1, "batch_size": 2, "max_length": 256, "save_steps": 1000, "logging_steps": 1,
                "lr": 1e-3, "warmup_ratio": 0.0}
    metrics = train_router(tmp_path / "train.parquet", tmp_path / "eval.parquet", llama_base, tmp_path / "router",
                           tmp_path / "ckpt", settings=settings, seed=0, config={})
    assert metrics["steps"] == 3
    assert metrics["train_loss"] > 0 and metrics["eval_loss"] is not None
    assert (tmp_path / "router" / "router.json").is_file()


def test_distillation_chat_rows_with_a_qwen_template_are_masked_per_assistant_turn(demo_tok_dir):
    from modelmake.distill import data

    tok = tokenizer_for(demo_tok_dir, "qwen2.5")
    tok.add_special_tokens({"pad_token": "<|endoftext|>"})
    convs = [("chat_en", CONVERSATION), ("chat_en", CONVERSATION[:2]), ("chat_en", CONVERSATION[:1])]
    rows = data.chat_rows(tok, convs, max_len=256)
    assert len(rows) == 2  # the unanswered question has nothing to learn
    for row, (_, conv) in zip(rows, convs):
        ids, labels = row["input_ids"], row["labels"]
        assert all(x == -100 or x == t for t, x in zip(ids, labels))
        trained = masked_spans(ids, [int(x != -100) for x in labels])
        assert [tok.decode(s) for s in trained] == [m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant"]
        assert "You are Qwen" not in "".join(tok.decode(s) for s in trained)


def test_distillation_chat_data_from_reformatted_tool_conversations_trains_on_calls_not_outputs(demo_tok_dir, tmp_path):
    """ShareGPT tool use (a system field, function_call, observation) through reformat and on to
    distillation's chat rows, read back from the parquet (nested tool calls, nulls)."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from modelmake.distill import data
    from modelmake.reformat import reformat_files

    raw = tmp_path / "tools.jsonl"
    raw.write_text("".join(json.dumps({"id": f"t{i}", "system": "You can call get_weather.", "conversations": [
        {"from": "human", "value": f"Weather in city {i}?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": i}})},
        {"from": "observation", "value": f"sunny, {20 + i} degrees"},
        {"from": "gpt", "value": f"It is {20 + i} degrees."}]}) + "\n" for i in range(4)), encoding="utf-8")
    parquet = tmp_path / "tools/reformatted/train.parquet"
    parquet.parent.mkdir(parents=True)
    reformat_files([raw], parquet)

    counts = data.build_chat([str(parquet)], str(demo_tok_dir), str(tmp_path / "train.parquet"),
                             str(tmp_path / "eval.parquet"), max_len=256, eval_rows=1, seed=0)

    assert counts["conversations"] == 4 and counts["train"] == 3
    tok = AutoTokenizer.from_pretrained(demo_tok_dir)
    for row in pq.read_table(tmp_path / "train.parquet").to_pylist():
        assert row["source"] == "tools"
        trained = [tok.decode(s) for s in masked_spans(row["input_ids"], [int(x != -100) for x in row["labels"]])]
        city = json.loads(trained[0].split("<tool_call>")[1].split("</tool_call>")[0])["arguments"]["city"]
        assert trained == [f'<tool_call>{{"name": "get_weather", "arguments": {{"city": {city}}}}}</tool_call><|eot_id|>',
                           f"It is {20 + city} degrees.<|eot_id|>"]
        assert "sunny" in tok.decode(row["input_ids"])
