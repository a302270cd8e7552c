"""Evaluate a self-play iteration on held-out prompts, and plot the metrics across iterations.

On the test split's KTO pairs (per prompt: the real answer and the answer the iteration's starting
model generated), with the trained model as policy and the starting model as reference:

* ``reward_margin``: beta * (mean r over real answers - mean r over generated ones), r the sequence
  log-ratio of policy to reference (KTO's implicit reward); > 0 when training moved probability
  from the model's own answers towards the real ones;
* ``win_rate``: share of prompts whose real answer gets the higher implicit reward than the
  generated one (a win-rate proxy: 0.5 is a coin flip);
* ``loglik_gap``: mean per-token log-likelihood of real answers minus that of generated ones under
  the trained model, and ``loglik_gap_start`` the same under the starting model (the change is
  what the iteration did); ``nll_real``: the trained model's per-token NLL of the real answers.

Tokenisation is the trainer's: the model's own chat template, the completion being what the
prompt+completion rendering adds to the prompt's.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from modelmake.errors import UserError
from modelmake.files import pyplot, save_figure, write_json


def _tokenize(tok, prompt, completion, max_length: int) -> tuple[list[int], int]:
    p = tok.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    full = tok.apply_chat_template(list(prompt) + list(completion), tokenize=True, return_dict=True)["input_ids"]
    n = 0
    while n < min(len(p), len(full)) and p[n] == full[n]:
        n += 1
    return full[:max_length], n


def sequence_logps(model, tok, rows, max_length: int, batch_size: int = 16) -> list[tuple[float, int]]:
    """(sum of completion-token log-probs, completion tokens) per row."""
    import torch

    encoded = [_tokenize(tok, r["prompt"], r["completion"], max_length) for r in rows]
    out = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(encoded), batch_size):
            chunk = encoded[i:i + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), tok.pad_token_id)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            comp = torch.zeros((len(chunk), width), dtype=torch.bool)
            for j, (seq, n_prompt) in enumerate(chunk):
                ids[j, :len(seq)] = torch.tensor(seq)
                mask[j, :len(seq)] = 1
                comp[j, n_prompt:len(seq)] = True
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            m = comp[:, 1:]
            out += [(float((lp[j] * m[j]).sum()), int(m[j].sum())) for j in range(len(chunk))]
    return out


def evaluate_iteration(test_kto: str | Path, model_dir: str | Path, start_dir: str | Path, out: str | Path, *,
                       beta: float, max_length: int, iteration: int) -> dict:
    """Write the metrics of the module docstring to ``out`` (JSON) and return them."""
    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    torch.manual_seed(0)
    df = pd.read_parquet(test_kto)
    if df.empty:
        raise UserError(f"{test_kto}: no test pairs to evaluate on")
    rows = df.to_dict("records")
    tok = AutoTokenizer.from_pretrained(model_dir)
    scores = {}
    for name, folder in (("policy", model_dir), ("ref", start_dir)):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        scores[name] = sequence_logps(model, tok, rows, max_length)
        del model
    by_id: dict[str, dict] = {}
    for row, (lp, n), (lr, _) in zip(rows, scores["policy"], scores["ref"]):
        by_id.setdefault(row["id"], {})[row["source"]] = {"r": lp - lr, "lp": lp, "lr": lr, "n": max(n, 1)}
    pairs = [v for v in by_id.values() if "real" in v and "generated" in v]

    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs) if xs else math.nan

    real, gen = [p["real"] for p in pairs], [p["generated"] for p in pairs]
    metrics = {
        "iteration": iteration, "pairs": len(pairs), "beta": beta,
        "reward_margin": beta * (mean(x["r"] for x in real) - mean(x["r"] for x in gen)),
        "reward_real": beta * mean(x["r"] for x in real), "reward_generated": beta * mean(x["r"] for x in gen),
        "win_rate": mean(float(p["real"]["r"] > p["generated"]["r"]) for p in pairs),
        "loglik_gap": mean(x["lp"] / x["n"] for x in real) - mean(x["lp"] / x["n"] for x in gen),
        "loglik_gap_start": mean(x["lr"] / x["n"] for x in real) - mean(x["lr"] / x["n"] for x in gen),
        "nll_real": -mean(x["lp"] / x["n"] for x in real),
        "nll_real_start": -mean(x["lr"] / x["n"] for x in real),
        "seconds": round(time.time() - started, 3),
    }
    write_json(out, metrics)
    return metrics


def plot_iterations(metrics_files: list[str | Path], png: str | Path, table: str | Path) -> list[dict]:
    """One figure of the per-iteration metrics (and their table as JSON) across iterations."""
    rows = sorted((json.loads(Path(p).read_text()) for p in metrics_files), key=lambda m: m["iteration"])
    it = [m["iteration"] for m in rows]
    fig, axes = pyplot().subplots(1, 3, figsize=(11, 3.3))
    axes[0].plot(it, [m["reward_margin"] for m in rows], marker="o")
    axes[0].set_title("reward margin real - generated")
    axes[1].plot(it, [m["win_rate"] for m in rows], marker="o")
    axes[1].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[1].set_title("win-rate proxy (real > generated)")
    axes[1].set_ylim(0, 1)
    axes[2].plot(it, [m["loglik_gap_start"] for m in rows], marker="o", label="starting model")
    axes[2].plot(it, [m["loglik_gap"] for m in rows], marker="o", label="trained model")
    axes[2].set_title("log-lik gap / token, real - generated")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.set_xticks(it)
    fig.tight_layout()
    save_figure(fig, png)
    write_json(table, {"iterations": rows})
    return rows
