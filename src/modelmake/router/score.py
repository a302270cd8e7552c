"""Score prompts with a router: the label-token logits at the answer position, not sampled text.

For each prompt the router's conversation (system instruction + ``[Question]...Prediction:``, then
the assistant header from the chat template's generation prompt) is run through the model once; the
logits of the five label tokens at the last position are softmaxed among themselves:

* ``p1``..``p5``: P([[k]]) over the five labels;
* ``expected_score``: sum k * P([[k]]);
* ``p_weak_ok``: P([[4]]) + P([[5]]), the probability that the weak model's answer is good enough.

Batched with left padding (the answer position is the last column of every row).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

from modelmake.config import default
from modelmake.errors import UserError
from modelmake.files import read_json
from modelmake.router.tokens import ROUTER_JSON, label_token_ids, prompt_messages

log = logging.getLogger(__name__)

COLUMNS = ["p1", "p2", "p3", "p4", "p5", "expected_score", "p_weak_ok"]


class RouterModel:
    """A router model folder loaded for scoring (CPU or the first GPU), in eval mode."""

    def __init__(self, model_dir: str | Path, device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = Path(model_dir)
        if not (model_dir / ROUTER_JSON).is_file():
            raise UserError(f"{model_dir}: no {ROUTER_JSON}; not a router model folder (build it with router-consolidate)")
        self.meta = read_json(model_dir / ROUTER_JSON)
        self.system = self.meta["system"]
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.label_ids = label_token_ids(self.tokenizer)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).to(self.device).eval()

    def encode(self, prompts: list[str]) -> Any:
        texts = [
            self.tokenizer.apply_chat_template(prompt_messages(p, self.system), tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        # the template already holds the BOS token: do not add special tokens twice
        return self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)

    def label_probs(self, prompts: list[str]) -> Any:
        """(len(prompts), 5) tensor of P([[k]]) among the five labels."""
        import torch

        batch = self.encode(prompts)
        with torch.inference_mode():
            logits = self.model(**batch, logits_to_keep=1).logits[:, -1, :]
        return torch.softmax(logits[:, self.label_ids].float(), dim=-1).cpu()


def score_prompts(router: RouterModel | str | Path, prompts: Iterable[str],
                  batch_size: int = default("router.score.batch_size")) -> "Any":
    """A DataFrame with COLUMNS, one row per prompt, in order."""
    import pandas as pd
    import torch

    if not isinstance(router, RouterModel):
        router = RouterModel(router)
    prompts = list(prompts)
    rows = []
    for i in range(0, len(prompts), batch_size):
        rows.append(router.label_probs(prompts[i:i + batch_size]))
    probs = torch.cat(rows) if rows else torch.zeros((0, 5))
    df = pd.DataFrame(probs.numpy(), columns=COLUMNS[:5])
    df["expected_score"] = (probs @ torch.arange(1, 6, dtype=torch.float32)).numpy()
    df["p_weak_ok"] = (probs[:, 3] + probs[:, 4]).numpy()
    return df


def score_file(model_dir: str | Path, parquet: str | Path, out: str | Path, *, batch_size: int, config: dict) -> dict:
    """Score every prompt of a router split (parquet with ``prompt``) into ``out`` (parquet with the
    split's id, prompt, label and scores columns plus COLUMNS); return summary counts."""
    import time

    import pandas as pd

    from modelmake.files import provenance_record, write_parquet

    started = time.time()
    df = pd.read_parquet(parquet)
    keep = [c for c in ("id", "prompt", "label", "weak_score", "strong_score") if c in df.columns]
    scores = score_prompts(model_dir, df["prompt"].tolist(), batch_size=batch_size)
    out_df = pd.concat([df[keep].reset_index(drop=True), scores], axis=1)
    summary = {"prompts": len(out_df), "p_weak_ok_mean": float(out_df["p_weak_ok"].mean())}
    if "label" in out_df:
        predicted = scores[COLUMNS[:5]].to_numpy().argmax(axis=1) + 1
        summary["label_accuracy"] = float((predicted == out_df["label"].to_numpy()).mean())
    write_parquet(out_df, out, provenance=provenance_record(config=config, inputs=[model_dir, parquet],
                                                            counts=summary, started=started))
    log.info("scored %s: %s", parquet, summary)
    return summary
