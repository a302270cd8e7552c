"""Demo assets: a BPE tokenizer with a chat template and a tiny Llama-family model.

Both are built from the project's sample corpora, seeded and deterministic, and saved with
``save_pretrained`` so that vLLM and transformers load them like any model from the hub. On a GPU
cluster the same config keys name real model folders instead and these builders are not used.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path

from modelmake.chat import template_messages
from modelmake.files import write_provenance
from modelmake.training import seed_everything

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
HEADER_START, HEADER_END, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, HEADER_START, HEADER_END, EOT]

# Llama-3 style: every message is "<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>";
# an assistant turn's tool calls follow its content as <tool_call>{"name": ..., "arguments": ...}</tool_call>,
# a tool's output is a "tool" turn. The assistant turns are wrapped in {% generation %} so transformers
# can build assistant masks.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] | trim }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{{ '<tool_call>' + {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson"
    " + '</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def corpus_texts(paths: list[str | Path]) -> list[str]:
    """All conversation turns of the given reformatted parquet files, in a stable order."""
    import pandas as pd

    texts = []
    for p in sorted(map(str, paths)):
        for messages in pd.read_parquet(p, columns=["messages"])["messages"]:
            texts.extend(m["content"] for m in messages)
    return texts


def build_tokenizer(corpora: list[str | Path], out: str | Path, vocab_size: int) -> None:
    """Train a byte-level BPE tokenizer on the corpora and save it as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    started = time.time()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_texts(corpora), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOT,  # generation stops at the end of the assistant turn
        pad_token=PAD,
        additional_special_tokens=[EOS, HEADER_START, HEADER_END],
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    out = Path(out)
    fast.save_pretrained(out)
    write_provenance(
        out,
        config={"vocab_size": vocab_size},
        inputs=corpora,
        counts={"vocab": len(fast)},
        started=started,
    )


def build_tiny_llama(
    tokenizer_dir: str | Path,
    corpora: list[str | Path],
    out: str | Path,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    max_len: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> dict:
    """Build a tiny Llama and fit it briefly on the chat corpora, so that it answers in-domain.

    Deterministic for a given seed on one machine (single thread order, deterministic kernels).
    """
    import pandas as pd
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    started = time.time()
    seed_everything(seed)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_len,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
        dtype="float32",
    )
    model = LlamaForCausalLM(cfg)

    conversations = []
    for p in sorted(map(str, corpora)):
        conversations += [template_messages(m) for m in pd.read_parquet(p, columns=["messages"])["messages"]]
    ids = [
        tok.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"][:max_len]
        for c in conversations
    ]

    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    model.train()
    losses = []
    for _step in tqdm(range(steps), desc="fit tiny llama", mininterval=5):
        batch = [ids[i] for i in rng.sample(range(len(ids)), k=min(batch_size, len(ids)))]
        width = max(map(len, batch))
        input_ids = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())

    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    metrics = {"first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:])}
    write_provenance(
        out,
        config={
            "hidden_size": hidden_size, "num_layers": num_layers, "num_heads": num_heads,
            "num_kv_heads": num_kv_heads, "intermediate_size": intermediate_size,
            "max_len": max_len, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
        },
        inputs=[tokenizer_dir, *corpora],
        counts={"conversations": len(ids), **metrics},
        started=started,
    )
    log.info("tiny llama: loss %.3f -> %.3f", metrics["first_loss"], metrics["last_loss"])
    return metrics
