"""lm_head.compact_lm_head: on a CPU, the model's own head at the scored positions gives what TRL's
fused LM head gives (log-probabilities, loss, gradients, the logged fields), with less work."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow  # imports TRL (~10 s)

FIELDS = ("log_probs", "entropy", "is_top1", "mean_logits", "log_sum_sq_probs")


def twin_models():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    models = [LlamaForCausalLM(cfg) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    for m in models:
        add_fused_lm_head(m, outputs=FIELDS)
    return models


def test_the_compact_head_gives_trls_log_probs_loss_gradients_and_logged_fields():
    import torch

    from modelmake.lm_head import compact_lm_head

    trl_head, compact = twin_models()
    compact_lm_head(compact, outputs=FIELDS[1:])
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (3, 12))
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0  # right padding
    labels = torch.full_like(ids, -100)
    labels[0, 10:] = ids[0, 10:]  # an answer at the end
    labels[1, 4:7] = ids[1, 4:7]  # in the middle
    labels[2, 7:9] = ids[2, 7:9]  # before the padding
    rows = []
    compact.lm_head.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[1]))
    outs = []
    for m in (trl_head, compact):
        out = m(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        out.loss.backward()
        outs.append((out, {n: p.grad.clone() for n, p in m.named_parameters()}))
    (a, grads_a), (b, grads_b) = outs
    assert rows == [7]  # positions 3-5, 6-7 and 9-10 (of 0-10) predict the scored tokens
    torch.testing.assert_close(b.loss, a.loss)
    for field in FIELDS:
        torch.testing.assert_close(getattr(b, field), getattr(a, field), msg=field)
    assert torch.equal(b.label_mask, a.label_mask)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, msg=name)


def test_a_batch_without_scored_tokens_gives_a_zero_loss_that_backpropagates():
    import torch

    from modelmake.lm_head import compact_lm_head

    _, model = twin_models()
    compact_lm_head(model)
    ids = torch.randint(0, 97, (2, 8))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.full_like(ids, -100),
                fused_lm_head=True)
    out.loss.backward()
    assert out.loss.item() == 0 and out.log_probs.shape == (2, 7)


def test_without_the_fused_flag_the_model_runs_as_before():
    import torch

    from modelmake.lm_head import compact_lm_head

    plain, model = twin_models()
    compact_lm_head(model)
    ids = torch.randint(0, 97, (2, 8))
    torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits)
