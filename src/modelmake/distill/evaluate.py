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
    """On the job's GPU in bf16 when it has one (fp32 on the CPU), with at most two models in memory:
    the teacher, then each student beside it in turn (the teacher's forward is repeated per student
    rather than keeping full-vocabulary log-probabilities of every eval token)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from modelmake.distill import hybrid
    from modelmake.distill.data import load_rows
    from modelmake.distill.losses import shifted_mask

    hybrid.register()
    started = time.time()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def load(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()

    data = {name: load_rows([path]) for name, path in evals.items()}

    def batches(name):
        ids, mask, labels = data[name]
        for i in range(0, ids.shape[0], batch_size):
            b_lab = labels[i:i + batch_size].to(device)
            yield ids[i:i + batch_size].to(device), mask[i:i + batch_size].to(device), b_lab, shifted_mask(b_lab)

    def log_probs(model, b_ids, b_mask):
        return F.log_softmax(model(input_ids=b_ids, attention_mask=b_mask).logits[:, :-1].float(), -1)

    def nll_of(logp, b_lab, m):
        return float(-(logp.gather(-1, b_lab[:, 1:].clamp(min=0)[..., None])[..., 0] * m).sum())

    teacher = load(teacher_dir)
    tokens = {name: 0 for name in data}
    nll = {name: {} for name in data}
    kl = {name: {} for name in data}
    with torch.no_grad():
        for name in data:
            total = 0.0
            for b_ids, b_mask, b_lab, m in batches(name):
                tokens[name] += int(m.sum())
                total += nll_of(log_probs(teacher, b_ids, b_mask), b_lab, m)
            nll[name]["teacher"] = total
        for key, path in students.items():
            student = load(path)
            for name in data:
                s_nll = s_kl = 0.0
                for b_ids, b_mask, b_lab, m in batches(name):
                    s_logp = log_probs(student, b_ids, b_mask)
                    s_nll += nll_of(s_logp, b_lab, m)
                    t_logp = F.log_softmax(log_probs(teacher, b_ids, b_mask) / temperature, -1)
                    s_logp = F.log_softmax(s_logp / temperature, -1)
                    s_kl += float(((t_logp.exp() * (t_logp - s_logp)).sum(-1) * m).sum())
                nll[name][key], kl[name][key] = s_nll, s_kl
            del student
    result: dict = {"datasets": {}, "models": {"teacher": teacher_dir, **students}, "temperature": temperature,
                    "device": device, "dtype": str(dtype).removeprefix("torch.")}
    for name in data:
        n = max(1, tokens[name])
        result["datasets"][name] = {
            "tokens": tokens[name],
            "perplexity": {k: round(math.exp(v / n), 4) for k, v in nll[name].items()},
            "kl_to_teacher": {k: round(v / n, 5) for k, v in kl[name].items()},
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
