r"""The KTO loss with a non-negative PU (nnPU) prior: real answers are labelled positives,
generated answers are unlabelled (some of them are as good as the real ones).

For a batch, with :math:`r_i = \log\pi_\theta(y_i|x_i) - \log\pi_\text{ref}(y_i|x_i)` the sequence
log-ratio of policy to reference, :math:`\beta` the KTO temperature, :math:`\pi` the prior (the
assumed share of good answers among generated ones), :math:`P` the real answers and :math:`U` the
generated ones::

    KL anchors (no gradient, floored at 0):
        z_P = max(0, mean_{i in P} r_i)            z_U = max(0, mean_{j in U} r_j)
    KTO value losses:
        l+(r) = 1 - sigmoid(beta * (r - z_P))      (an answer treated as desirable)
        l-(r) = 1 - sigmoid(beta * (z_U - r))      (an answer treated as undesirable)
    risks:
        R_P+ = mean_{i in P} l+(r_i)               positive risk on real answers
        R_P- = mean_{i in P} l-(r_i)               negative risk on real answers
        R_U- = mean_{j in U} l-(r_j)               negative risk on generated answers
        N    = R_U- - pi * R_P-                    negative risk of the bad generated answers
                                                   (the good ones, a pi share, look like real ones)
    loss (w+ = desirable_weight, w- = undesirable_weight, gamma = the corrective step size):
        N >= 0:  L = w+ * R_P+ + w- * N            (the unbiased PU risk)
        N <  0:  L = -gamma * w- * N               (corrective step: N cannot be negative, so the
                                                    model has overfitted the generated answers;
                                                    step back up on N alone, as in Kiryo et al.
                                                    2017, Algorithm 1 with threshold 0)

Both l- use the one anchor z_U so that the PU identity behind N holds for one loss function.
Kiryo et al. weight R_P+ by pi because there the positives are a pi share of the data; here the
real answers are their own labelled set and enter with the KTO desirable weight (set
``desirable_weight = prior`` for the paper's exact form). A batch without generated answers has no
N (L = w+ R_P+); a batch without real answers has R_P+ = R_P- = 0 and z_P = 0.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class NnPUKTOOutput:
    loss: "object"  # a 0-dim torch tensor with the gradient
    risk: float  # w+ R_P+ + w- max(0, N): the estimate the corrective step protects
    positive_risk: float  # R_P+
    negative_risk_real: float  # R_P-
    negative_risk_generated: float  # R_U-
    negative_risk: float  # N
    corrective: bool
    anchor_real: float  # z_P
    anchor_generated: float  # z_U
    reward_real: float  # beta * mean r over real answers (nan when none)
    reward_generated: float  # beta * mean r over generated answers (nan when none)


def nnpu_kto_loss(policy_logps, ref_logps, labels, *, beta: float, prior: float, gamma: float = 1.0,
                  desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> NnPUKTOOutput:
    """The loss of the module docstring for one batch.

    ``policy_logps`` and ``ref_logps``: sequence log-probabilities of the answers (shape [B]);
    ``labels``: bool [B], true for real answers (labelled positives), false for generated ones.
    """
    import torch

    labels = torch.as_tensor(labels, dtype=torch.bool, device=policy_logps.device)
    r = policy_logps - ref_logps.to(policy_logps.dtype)
    rp, ru = r[labels], r[~labels]
    zero = r.sum() * 0.0  # keeps the graph (and the device/dtype) when a side is empty
    z_p = rp.detach().mean().clamp(min=0) if rp.numel() else zero.detach()
    z_u = ru.detach().mean().clamp(min=0) if ru.numel() else zero.detach()

    def pos(x):
        return 1 - torch.sigmoid(beta * (x - z_p))

    def neg(x):
        return 1 - torch.sigmoid(beta * (z_u - x))

    r_p_pos = pos(rp).mean() if rp.numel() else zero
    r_p_neg = neg(rp).mean() if rp.numel() else zero
    if ru.numel():
        r_u_neg = neg(ru).mean()
        n = r_u_neg - prior * r_p_neg
    else:
        r_u_neg = zero
        n = None
    if n is None:
        loss, corrective, n_value = desirable_weight * r_p_pos, False, float("nan")
        risk = loss.item()
    else:
        n_value = n.item()
        corrective = n_value < 0
        loss = -gamma * undesirable_weight * n if corrective else desirable_weight * r_p_pos + undesirable_weight * n
        risk = desirable_weight * r_p_pos.item() + undesirable_weight * max(0.0, n_value)
    nan = float("nan")
    return NnPUKTOOutput(
        loss=loss, risk=risk, positive_risk=r_p_pos.item(), negative_risk_real=r_p_neg.item(),
        negative_risk_generated=r_u_neg.item(), negative_risk=n_value, corrective=corrective,
        anchor_real=z_p.item(), anchor_generated=z_u.item(),
        reward_real=beta * rp.detach().mean().item() if rp.numel() else nan,
        reward_generated=beta * ru.detach().mean().item() if ru.numel() else nan,
    )
