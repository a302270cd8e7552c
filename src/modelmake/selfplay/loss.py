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
        N    = R_U- - pi * R_P-                    (1 - pi) x the negative risk of the bad
                                                   generated answers (the good ones, a pi share,
                                                   are distributed like the real ones)
    loss (Kiryo et al. 2017, nnPU, Algorithm 1 with threshold 0; w+ = desirable_weight and
    w- = undesirable_weight, both 1 by default; gamma = the corrective step size):
        N >= 0:  L = w+ * pi * R_P+ + w- * N       (the unbiased PU risk
                                                    pi R_P+ + R_U- - pi R_P-)
        N <  0:  L = -gamma * w- * N               (corrective step: N estimates a risk, which
                                                    cannot be negative, so the model has
                                                    overfitted the generated answers;
                                                    descend on -gamma N: step back up on N alone,
                                                    the positive risk is not trained this step)
    the reported (non-negative) risk estimate:
        R = w+ * pi * R_P+ + w- * max(0, N)

With the default weights this is the standard nnPU risk R = pi R_P+ + max(0, R_U- - pi R_P-) and
its corrective gradient -gamma (R_U- - pi R_P-), with KTO's value functions as the losses l+ and l-.
The positive risk is weighted by pi because the real answers stand for the good share (pi) of the
generated answers: the PU risk is pi R_P+ + (1 - pi) R_N-, and N replaces (1 - pi) R_N-. Both negative risks use the one loss l-, i.e. the one anchor z_U: the PU
identity behind N (R_U- = pi R_P- + (1 - pi) R_N-, the negative risk of the bad answers R_N-) holds
only when R_P- and R_U- average the same loss function. A batch without generated answers has no N
(L = w+ pi R_P+); a batch without real answers has R_P+ = R_P- = 0 and z_P = 0.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class NnPUKTOOutput:
    loss: "object"  # a 0-dim torch tensor with the gradient
    risk: float  # w+ pi R_P+ + w- max(0, N): the estimate the corrective step protects
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
        loss, corrective, n_value = desirable_weight * prior * r_p_pos, False, float("nan")
        risk = loss.item()
    else:
        n_value = n.item()
        corrective = n_value < 0
        positive = desirable_weight * prior * r_p_pos
        loss = -gamma * undesirable_weight * n if corrective else positive + undesirable_weight * n
        risk = positive.item() + undesirable_weight * max(0.0, n_value)
    nan = float("nan")
    return NnPUKTOOutput(
        loss=loss, risk=risk, positive_risk=r_p_pos.item(), negative_risk_real=r_p_neg.item(),
        negative_risk_generated=r_u_neg.item(), negative_risk=n_value, corrective=corrective,
        anchor_real=z_p.item(), anchor_generated=z_u.item(),
        reward_real=beta * rp.detach().mean().item() if rp.numel() else nan,
        reward_generated=beta * ru.detach().mean().item() if ru.numel() else nan,
    )
