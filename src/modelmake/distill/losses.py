"""Distillation losses. Positions follow the model's own shift: logits at t predict token t+1."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def hidden_mse(student_hiddens, teacher_hiddens, attention_mask) -> torch.Tensor:
    """Stage 1: mean over layers 1..L of the per-token MSE between layer outputs, padding masked.

    ``*_hiddens``: sequences of [B, T, H] (embeddings first, skipped: they are shared and frozen)."""
    mask = attention_mask.to(student_hiddens[1].dtype)
    denom = mask.sum().clamp(min=1)
    losses = []
    for s, t in zip(student_hiddens[1:], teacher_hiddens[1:]):
        per_token = (s.float() - t.float()).pow(2).mean(-1)
        losses.append((per_token * mask).sum() / denom)
    return torch.stack(losses).mean()


def shifted_mask(labels: torch.Tensor) -> torch.Tensor:
    """[B, T-1] bool: positions t whose next token t+1 is trained on."""
    return labels[:, 1:] != IGNORE


def kl_to_teacher(student_logits, teacher, labels, temperature: float) -> torch.Tensor:
    """KL(teacher || student) at temperature T, mean over trained positions, times T^2.

    ``teacher`` is full logits [B, T, V] or a (values, indices) top-k pair [B, T, k]: then both
    distributions are renormalised over the teacher's top k (the student's logits read at those ids),
    a KL that is 0 exactly when the student ranks and weighs the teacher's k candidates as it does.
    (Comparing the teacher's renormalised top k with the student's full-vocabulary probabilities
    instead has a floor of -log(the student's mass on those k): it rewards piling all mass onto
    them, which at temperature T > 1 sharpens the student and raised its KL to the teacher at T = 1.)"""
    mask = shifted_mask(labels)
    if isinstance(teacher, tuple):
        vals, idx = teacher
        t_logp = F.log_softmax(vals[:, :-1].float() / temperature, dim=-1)
        s_logp = F.log_softmax(student_logits[:, :-1].float().gather(-1, idx[:, :-1]) / temperature, dim=-1)
    else:
        t_logp = F.log_softmax(teacher[:, :-1].float() / temperature, dim=-1)
        s_logp = F.log_softmax(student_logits[:, :-1].float() / temperature, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1) * temperature ** 2


def ce(student_logits, labels) -> torch.Tensor:
    """Next-token cross-entropy over trained positions (one shift, here)."""
    return F.cross_entropy(student_logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE)
