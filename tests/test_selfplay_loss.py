"""The nnPU KTO loss against hand-computed batches (both branches), and the self-play data steps."""

from __future__ import annotations

import json
import math

import pytest
import torch

from modelmake.selfplay.loss import nnpu_kto_loss


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def dsig(x: float) -> float:
    return sig(x) * (1 - sig(x))


# real answers: r = [1, 3] -> z_P = 2; generated: r = [-1, 1] -> mean 0 -> z_U = 0 (beta = 1)
POLICY = [1.0, 3.0, -1.0, 1.0]
REF = [0.0, 0.0, 0.0, 0.0]
LABELS = [True, True, False, False]
R_P_POS = ((1 - sig(1 - 2)) + (1 - sig(3 - 2))) / 2  # l+ on real, anchor z_P: = 0.5
R_P_NEG = ((1 - sig(0 - 1)) + (1 - sig(0 - 3))) / 2  # l- on real, anchor z_U: ~ 0.8418
R_U_NEG = ((1 - sig(0 + 1)) + (1 - sig(0 - 1))) / 2  # l- on generated, anchor z_U: = 0.5


def batch(policy=POLICY, ref=REF):
    return torch.tensor(policy, requires_grad=True), torch.tensor(ref)


def test_unbiased_branch_is_pi_positive_risk_plus_negative_risk():
    p, r = batch()
    out = nnpu_kto_loss(p, r, LABELS, beta=1.0, prior=0.5)
    n = R_U_NEG - 0.5 * R_P_NEG  # ~ 0.0791
    assert n > 0 and not out.corrective
    assert out.anchor_real == pytest.approx(2.0) and out.anchor_generated == pytest.approx(0.0)
    assert out.positive_risk == pytest.approx(R_P_POS)
    assert out.negative_risk_real == pytest.approx(R_P_NEG)
    assert out.negative_risk_generated == pytest.approx(R_U_NEG)
    assert out.negative_risk == pytest.approx(n, abs=1e-6)
    # nnPU: pi R_P+ + (R_U- - pi R_P-)
    assert out.loss.item() == pytest.approx(0.5 * R_P_POS + n, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.3290918, abs=1e-6)
    assert out.risk == pytest.approx(out.loss.item(), abs=1e-6)
    out.loss.backward()
    # by hand (anchors carry no gradient): real i: pi/|P| * (dl+/dr - dl-/dr), generated j: 1/|U| * dl-/dr
    expected = [0.5 / 2 * (-dsig(1 - 2) - dsig(0 - 1)), 0.5 / 2 * (-dsig(3 - 2) - dsig(0 - 3)),
                dsig(0 + 1) / 2, dsig(0 - 1) / 2]
    assert p.grad.tolist() == pytest.approx(expected, abs=1e-6)
    # descending the loss raises real answers and lowers generated ones
    assert p.grad[0] < 0 and p.grad[1] < 0 and p.grad[2] > 0 and p.grad[3] > 0


def test_corrective_branch_when_negative_risk_goes_below_zero():
    p, r = batch()
    out = nnpu_kto_loss(p, r, LABELS, beta=1.0, prior=0.9, gamma=2.0)
    n = R_U_NEG - 0.9 * R_P_NEG  # ~ -0.2576
    assert n < 0 and out.corrective
    assert out.negative_risk == pytest.approx(n, abs=1e-6)
    assert out.loss.item() == pytest.approx(-2.0 * n, abs=1e-6)  # -gamma N = 0.5152694
    assert out.loss.item() == pytest.approx(0.5152694, abs=1e-6)
    assert out.risk == pytest.approx(0.9 * R_P_POS, abs=1e-6)  # pi R_P+ + max(0, N): N clipped at 0
    out.loss.backward()
    # by hand: d(-gamma N)/dr: real i: gamma pi/|P| * dl-/dr, generated j: -gamma/|U| * dl-/dr
    expected = [2.0 * 0.9 / 2 * dsig(0 - 1), 2.0 * 0.9 / 2 * dsig(0 - 3), -2.0 / 2 * dsig(0 + 1),
                -2.0 / 2 * dsig(0 - 1)]
    assert p.grad.tolist() == pytest.approx(expected, abs=1e-6)
    # the corrective step pushes the generated answers back up (it undoes overfitting them) and
    # does not train the positive risk: the real answers move only through -pi R_P-
    assert p.grad[2] < 0 and p.grad[3] < 0
    assert torch.all(p.grad[:2] > 0)


def test_anchors_are_floored_at_zero_and_use_the_log_ratio():
    p, r = batch(policy=[-2.0, -1.0, -3.0, -4.0], ref=[-1.0, 0.0, -1.0, -1.0])  # r = [-1, -1, -2, -3]
    out = nnpu_kto_loss(p, r, LABELS, beta=0.5, prior=0.2)
    assert out.anchor_real == 0.0 and out.anchor_generated == 0.0
    assert out.reward_real == pytest.approx(0.5 * -1.0)
    assert out.reward_generated == pytest.approx(0.5 * -2.5)
    pos = 1 - sig(0.5 * (-1 - 0))
    neg_real = 1 - sig(0.5 * (0 + 1))
    neg_gen = ((1 - sig(0.5 * 2)) + (1 - sig(0.5 * 3))) / 2
    assert out.loss.item() == pytest.approx(0.2 * pos + (neg_gen - 0.2 * neg_real), abs=1e-6)


def test_weights_scale_the_two_sides():
    p, r = batch()
    out = nnpu_kto_loss(p, r, LABELS, beta=1.0, prior=0.5, desirable_weight=0.5, undesirable_weight=2.0)
    assert out.loss.item() == pytest.approx(0.5 * 0.5 * R_P_POS + 2.0 * (R_U_NEG - 0.5 * R_P_NEG), abs=1e-6)


def test_batch_without_generated_answers_trains_the_positive_risk_only():
    p, r = torch.tensor([1.0, 3.0], requires_grad=True), torch.zeros(2)
    out = nnpu_kto_loss(p, r, [True, True], beta=1.0, prior=0.5)
    assert not out.corrective and math.isnan(out.negative_risk)
    assert out.loss.item() == pytest.approx(0.5 * R_P_POS, abs=1e-6)  # pi R_P+


def test_prompts_fractions_and_kto_pairs(tmp_path):
    import pandas as pd

    from modelmake.selfplay.data import fraction_bounds, single_turn, to_kto, write_fractions

    assert fraction_bounds(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert fraction_bounds(5, 0) == [(0, 5)]
    conv = [
        {"id": "a", "messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "r1"},
                                 {"role": "user", "content": "q1b"}, {"role": "assistant", "content": "r1b"}]},
        {"id": "b", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q2"},
                                 {"role": "assistant", "content": "r2"}]},
        {"id": "c", "messages": [{"role": "user", "content": "q3"}]},
        {"id": "d", "messages": [{"role": "user", "content": "q4"}, {"role": "assistant", "content": "r4"}]},
    ]
    pd.DataFrame(conv).to_parquet(tmp_path / "ref.parquet")
    counts = single_turn(tmp_path / "ref.parquet", tmp_path / "single.parquet")
    assert counts == {"conversations": 4, "prompts": 3, "skipped": 1}
    single = pd.read_parquet(tmp_path / "single.parquet")
    assert single.to_dict("records")[1] == {"id": "b", "prompt": "q2", "real": "r2"}
    fr = write_fractions(tmp_path / "single.parquet", tmp_path / "fr", 2)
    assert [p.name for p in fr] == ["frac0.jsonl", "frac1.jsonl"]
    rec = json.loads(fr[0].read_text().splitlines()[0])
    assert rec == {"id": "a", "messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "r1"}]}
    # generated outputs as modelmake.generate writes them: one with an error
    gen0 = [{"id": "a", "messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "g1"}]},
            {"id": "b", "messages": None, "error": "boom"}]
    gen1 = [{"id": "d", "messages": [{"role": "user", "content": "q4"}, {"role": "assistant", "content": "g4"}]}]
    for name, rows in (("g0.jsonl", gen0), ("g1.jsonl", gen1)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = to_kto(tmp_path / "single.parquet", [tmp_path / "g0.jsonl", tmp_path / "g1.jsonl"],
                    tmp_path / "kto.parquet")
    assert counts["pairs"] == 2 and counts["failed"] == 1
    kto = pd.read_parquet(tmp_path / "kto.parquet")
    assert list(kto["label"]) == [True, False, True, False]  # pairs side by side
    assert sorted(set(kto["id"])) == ["a", "d"]
    by = {(r["id"], r["source"]): r["completion"][0]["content"] for r in kto.to_dict("records")}
    assert by == {("a", "real"): "r1", ("a", "generated"): "g1", ("d", "real"): "r4", ("d", "generated"): "g4"}
    # a fraction listed twice would duplicate rows: refused
    from modelmake.errors import RecordError

    with pytest.raises(RecordError, match="generated twice"):
        to_kto(tmp_path / "single.parquet", [tmp_path / "g1.jsonl", tmp_path / "g1.jsonl"], tmp_path / "x.parquet")
