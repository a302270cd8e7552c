"""TRL's fused LM head on a CPU: :func:`compact_lm_head` (the router's SFT and self-play's KTO trainers).

A module of its own, apart from :mod:`modelmake.training`, which every training and asset job
imports: only the rules whose environment holds TRL reach this one (``scripts/envcheck.py imports``).
"""

from __future__ import annotations

from typing import Any


def compact_lm_head(model: Any, outputs: tuple[str, ...] = ()) -> None:
    """Where TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``, already on ``model``) has no
    Triton kernel (a CPU), compute what it returns with the model's own head, run at the scored
    positions only (a LoRA model: its base model's).

    Without Triton, TRL's head scores every position in torch tiles and projects the hidden states
    onto the vocabulary again in the backward pass (on a GPU it scores only the positions whose label
    is not -100, in Triton). Here ``model(..., labels=labels, fused_lm_head=True)`` runs the model's
    own forward with ``logits_to_keep``: the positions whose next-token label some row of the batch
    scores (a router's answer: two per example), then the log-softmax at those positions. Same
    log-probabilities and loss up to float rounding, the model's own logit scaling and softcapping;
    the gradient flows through the log-probabilities only. ``outputs``: the fields to fill besides
    ``log_probs`` (of ``"entropy"``, ``"is_top1"``, ``"mean_logits"``, ``"log_sum_sq_probs"``), all
    without gradient (SFTTrainer logs ``("entropy", "is_top1")``; a loss that reads ``log_probs`` only,
    as self-play's, needs none). Temperature 1 (SFT, KTO). TRL's head still runs on a CUDA or XPU
    device, for shifted labels, MoE router logits, positional arguments, and for a model whose
    forward takes no ``logits_to_keep``.
    """
    import functools
    import inspect
    import types

    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        model = model.get_base_model()  # LoRA: TRL patched the base model
    cls_forward = type(model).forward
    if "logits_to_keep" not in inspect.signature(cls_forward).parameters:
        return
    if getattr(model.config.get_text_config(), "output_router_logits", False):
        return
    fused = model.forward  # TRL's

    @functools.wraps(cls_forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        ids = kwargs.get("input_ids")
        if (not fused_lm_head or args or ids is None or ids.device.type in ("cuda", "xpu")
                or shift_labels is not None or kwargs.get("output_router_logits")):
            return fused(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                         num_items_in_batch=num_items_in_batch, **kwargs)
        target = labels[:, 1:]
        mask = target != -100
        keep = mask.any(0).nonzero().squeeze(-1)  # position p's logits predict token p + 1
        logits = cls_forward(self, **{**kwargs, "use_cache": False}, logits_to_keep=keep).logits.float()
        kept, scored = target[:, keep].clamp(min=0), mask[:, keep]
        log_z = logits.logsumexp(-1)

        def spread(x):  # [B, K] at the kept positions -> [B, T - 1], zero where the label is -100
            return x.new_zeros(target.shape).index_copy(1, keep, x.masked_fill(~scored, 0))

        log_probs = spread(logits.gather(-1, kept.unsqueeze(-1)).squeeze(-1) - log_z)
        fields = {}
        with torch.no_grad():
            log_p = logits - log_z.unsqueeze(-1) if {"entropy", "log_sum_sq_probs"} & set(outputs) else None
            if "entropy" in outputs:
                fields["entropy"] = spread(-(log_p.exp() * log_p).sum(-1))
            if "log_sum_sq_probs" in outputs:
                fields["log_sum_sq_probs"] = spread((2 * log_p).logsumexp(-1))
            if "mean_logits" in outputs:
                fields["mean_logits"] = spread(logits.mean(-1))
            if "is_top1" in outputs:
                fields["is_top1"] = spread(logits.argmax(-1) == kept)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -log_probs.sum() / count
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, label_mask=mask, **fields)

    model.forward = types.MethodType(forward, model)
