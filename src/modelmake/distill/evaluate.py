"""Held-out evaluation: perplexity of the teacher and of the student before and after each stage,
and KL(teacher || student) per trained token, on every eval dataset (chat, web), as one JSON."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from modelmake.config import default
from modelmake.files import pyplot, save_figure, write_json

log = logging.getLogger(__name__)


def evaluate(teacher_dir: str, students: dict[str, str], evals: dict[str, str], out: str, *,
             batch_size: int = default("distill.eval.batch_size"),
             temperature: float = default("distill.eval.temperature"), config: dict | None = None) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from modelmake.distill import hybrid
    from modelmake.distill.data import load_rows
    from modelmake.distill.losses import shifted_mask

    hybrid.register()
    started = time.time()
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    models = {"teacher": teacher, **{k: AutoModelForCausalLM.from_pretrained(v).eval() for k, v in students.items()}}
    result: dict = {"datasets": {}, "models": {"teacher": teacher_dir, **students}, "temperature": temperature}
    for name, path in evals.items():
        ids, mask, labels = load_rows([path])
        nll = {k: 0.0 for k in models}
        kl = {k: 0.0 for k in models if k != "teacher"}
        tokens = 0
        with torch.no_grad():
            for i in range(0, ids.shape[0], batch_size):
                b_ids, b_mask, b_lab = ids[i:i + batch_size], mask[i:i + batch_size], labels[i:i + batch_size]
                m = shifted_mask(b_lab)
                tokens += int(m.sum())
                t_logp = None
                for k, model in models.items():
                    logits = model(input_ids=b_ids, attention_mask=b_mask).logits[:, :-1].float()
                    logp = F.log_softmax(logits, -1)
                    tgt = b_lab[:, 1:].clamp(min=0)
                    nll[k] += float(-(logp.gather(-1, tgt[..., None])[..., 0] * m).sum())
                    if k == "teacher":
                        t_logp = F.log_softmax(logits / temperature, -1)
                    else:
                        s_logp = F.log_softmax(logits / temperature, -1)
                        kl[k] += float(((t_logp.exp() * (t_logp - s_logp)).sum(-1) * m).sum())
        result["datasets"][name] = {
            "tokens": tokens,
            "perplexity": {k: round(math.exp(v / max(1, tokens)), 4) for k, v in nll.items()},
            "kl_to_teacher": {k: round(v / max(1, tokens), 5) for k, v in kl.items()},
        }
        log.info("%s: %s", name, result["datasets"][name])
    result["config"] = config or {}
    result["wall_seconds"] = round(time.time() - started, 3)
    write_json(out, result)
    return result


def plot_metrics(metrics: dict, png: str | Path) -> None:
    """Bars of perplexity per model and dataset (log scale), KL in the title lines."""
    names = list(metrics["datasets"])
    models = list(next(iter(metrics["datasets"].values()))["perplexity"])
    fig, axes = pyplot().subplots(1, len(names), figsize=(4.5 * len(names), 3.5), squeeze=False)
    for ax, ds in zip(axes[0], names):
        ppl = metrics["datasets"][ds]["perplexity"]
        ax.bar(models, [ppl[m] for m in models], color=["#555"] + ["#4a7"] * (len(models) - 1))
        ax.set_yscale("log")
        ax.set_title(f"{ds}: held-out perplexity")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    save_figure(fig, png)
