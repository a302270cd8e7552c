"""Unit tests of the distillation pieces: hybrid student, recurrence, data, losses, the teacher
protocol over a real Gloo group (two processes), and the stage supervisor's fail-fast."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from modelmake.distill import data, hybrid, losses
from modelmake.distill.service import Layout, ProtocolError, Spec, check_specs
from modelmake.procs import free_port


def tiny_llama(heads=4, kv_heads=2, layers=2, vocab=97, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def test_gqa_expansion_matches_transformers_repeat_kv():
    from transformers.models.llama.modeling_llama import repeat_kv

    teacher = tiny_llama(heads=4, kv_heads=2)
    attn = teacher.model.layers[0].self_attn
    x = torch.randn(1, 5, 32)
    k = attn.k_proj(x).view(1, 5, 2, 8).transpose(1, 2)  # [B, kv heads, T, D]
    expected = repeat_kv(k, 2)  # what attention uses for query head h
    w = hybrid.expand_kv(attn.k_proj.weight, 4, 2, 8)
    got = (x @ w.T).view(1, 5, 4, 8).transpose(1, 2)
    torch.testing.assert_close(got, expected)


def test_time_mix_is_initialised_from_the_layers_attention():
    teacher = tiny_llama()
    student = hybrid.from_teacher(teacher, [1])
    tm, attn = student.model.layers[1].self_attn, teacher.model.layers[1].self_attn
    assert isinstance(tm, hybrid.TimeMix)
    torch.testing.assert_close(tm.receptance.weight, attn.q_proj.weight)
    torch.testing.assert_close(tm.output.weight, attn.o_proj.weight)
    torch.testing.assert_close(tm.value.weight, hybrid.expand_kv(attn.v_proj.weight, 4, 2, 8))
    # other layers, embeddings and head are the teacher's
    torch.testing.assert_close(student.model.layers[0].self_attn.q_proj.weight, teacher.model.layers[0].self_attn.q_proj.weight)
    torch.testing.assert_close(student.lm_head.weight, teacher.lm_head.weight)
    ids = torch.randint(3, 97, (2, 7))
    with torch.no_grad():
        a = teacher(input_ids=ids, output_hidden_states=True).hidden_states
        b = student(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(a[1], b[1])  # layer 0 untouched
    assert not torch.allclose(a[2], b[2])  # layer 1 replaced


def test_recurrence_equals_the_explicit_sum():
    torch.manual_seed(0)
    b, h, t, d = 1, 2, 5, 3
    r, k, v = (torch.randn(b, h, t, d) for _ in range(3))
    w = torch.rand(b, h, t, d) * 0.9 + 0.05
    u = torch.randn(h, d)
    y, _ = hybrid.recurrence(r, k, v, w, u)
    for i in range(t):
        s = torch.zeros(b, h, d, d)
        for j in range(i):
            decay = torch.ones(b, h, d)
            for m in range(j + 1, i):
                decay = decay * w[:, :, m]
            s = s + (decay * k[:, :, j])[..., None] * v[:, :, j, None, :]
        s = s + (u * k[:, :, i])[..., None] * v[:, :, i, None, :]
        torch.testing.assert_close(y[:, :, i], torch.einsum("bhd,bhde->bhe", r[:, :, i], s))


def test_padding_never_changes_real_tokens_outputs():
    student = hybrid.from_teacher(tiny_llama(), [0, 1])
    ids = torch.randint(3, 97, (1, 6))
    for tm in student.time_mixes():  # a trained model's token shift is not zero
        torch.nn.init.uniform_(tm.mu, 0.2, 0.8)
    with torch.no_grad():
        plain = student(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        right = student(input_ids=torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1),
                        attention_mask=torch.tensor([[1] * 6 + [0] * 3])).logits
        left = student(input_ids=torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1),
                       attention_mask=torch.tensor([[0] * 3 + [1] * 6])).logits
    torch.testing.assert_close(plain, right[:, :6])
    torch.testing.assert_close(plain, left[:, 3:])  # every layer recurrent: pads leave no trace


def test_gradient_checkpointing_gives_the_gradients_of_a_plain_backward_with_padding():
    """The recomputation in the backward pass sees the padding mask the forward saw (it reaches the
    time-mix as a layer argument, not as state that the model's forward resets)."""
    teacher = tiny_llama()
    ids = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    grads = []
    for checkpointing in (False, True):
        student = hybrid.from_teacher(teacher, [1])
        if checkpointing:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student.train()
        student(input_ids=ids, attention_mask=mask).logits.sum().backward()
        grads.append({n: p.grad for n, p in student.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-5) for n in grads[0])


def test_student_folder_loads_with_remote_code_and_generates(tmp_path):
    from transformers import AutoModelForCausalLM

    student = hybrid.from_teacher(tiny_llama(), [1])
    student.save_pretrained(tmp_path)
    assert (tmp_path / "hybrid.py").exists()
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"].startswith("hybrid.")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    ids = torch.randint(3, 97, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, student(input_ids=ids).logits)
    out = loaded.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)
    hybrid.register()  # and through the registered Auto classes
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)).__name__ == "HybridForCausalLM"


def test_rwkv_layers_out_of_range_are_rejected():
    with pytest.raises(ValueError, match="out of range"):
        hybrid.from_teacher(tiny_llama(layers=2), [2])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    import pandas as pd
    from transformers import AutoTokenizer

    from modelmake.assets import build_tokenizer

    d = tmp_path_factory.mktemp("tok")
    msgs = [[{"role": "user", "content": f"question {i} about the moon"},
             {"role": "assistant", "content": f"answer {i}: the moon is far"}] for i in range(30)]
    pd.DataFrame({"id": [str(i) for i in range(30)], "messages": msgs}).to_parquet(d / "c.parquet")
    build_tokenizer([d / "c.parquet"], d / "tok", 300)
    return AutoTokenizer.from_pretrained(d / "tok")


def test_chat_labels_cover_assistant_tokens_only_and_are_not_shifted(tokenizer):
    conv = [{"role": "user", "content": "question about the moon"},
            {"role": "assistant", "content": "the moon is far"}]
    (row,) = data.chat_rows(tokenizer, [("x", conv)], max_len=64)
    ids, labels, mask = row["input_ids"], row["labels"], row["attention_mask"]
    assert len(ids) == len(labels) == 64 and mask.count(1) < 64
    trained = [i for i, x in enumerate(labels) if x != -100]
    assert all(labels[i] == ids[i] for i in trained)  # not shifted: the model's loss shifts once
    assert tokenizer.decode([ids[i] for i in trained]).startswith("the moon is far")
    assert "question" not in tokenizer.decode([ids[i] for i in trained])
    assert all(labels[i] == -100 for i in range(64) if mask[i] == 0)


def test_web_text_is_interleaved_by_language_and_packed(tokenizer):
    pairs = data.interleave({"zh": ["z1", "z2", "z3"], "en": ["e1", "e2"]}, seed=0)
    assert [lang for lang, _ in pairs] == ["en", "zh", "en", "zh", "zh"]
    rows = data.web_rows(tokenizer, [("en", "the moon is far " * 5), ("zh", "月亮 " * 10)], max_len=16, pack=True)
    assert rows and all(len(r["input_ids"]) == 16 and sum(r["attention_mask"]) == 16 for r in rows)
    assert rows[0]["labels"] == rows[0]["input_ids"]


def test_bad_web_record_names_file_and_line(tmp_path):
    from modelmake.errors import RecordError

    p = tmp_path / "web.jsonl"
    p.write_text('{"text": "fine"}\n{"txt": 3}\n')
    with pytest.raises(RecordError, match=r"web.jsonl:2"):
        data.read_web(p)


def test_kl_is_zero_against_itself_and_counts_only_trained_next_tokens():
    logits = torch.randn(2, 6, 11)
    labels = torch.full((2, 6), -100)
    assert float(losses.kl_to_teacher(logits, logits, labels, 2.0)) == 0.0
    labels[0, 3] = 5  # position 2 predicts token 3: the only position counted
    other = logits.clone()
    other[0, 4] += 5.0  # a change at an untrained position leaves the loss alone
    torch.testing.assert_close(losses.kl_to_teacher(logits, other, labels, 1.0), torch.tensor(0.0))
    other[0, 2] += torch.randn(11)
    assert float(losses.kl_to_teacher(other, logits, labels, 1.0)) > 0
    vals, idx = logits.topk(11, -1)  # top-k over the whole vocabulary = full logits
    torch.testing.assert_close(losses.kl_to_teacher(other, (vals, idx), labels, 1.0),
                               losses.kl_to_teacher(other, logits, labels, 1.0))


def test_top_k_kl_is_zero_for_a_student_that_matches_the_teacher_on_its_top_k():
    """A student equal to the teacher has nothing to learn, whatever k and the temperature; its tail
    beyond the teacher's top k is not pulled onto the k (that sharpened students at T > 1)."""
    teacher = torch.randn(2, 6, 11)
    labels = torch.zeros(2, 6, dtype=torch.long)
    top = teacher.topk(4, -1)
    for t in (1.0, 2.0):
        torch.testing.assert_close(losses.kl_to_teacher(teacher, top, labels, t), torch.tensor(0.0))
    student = teacher.clone()
    student.scatter_add_(-1, teacher.topk(7, -1).indices[..., 4:], torch.full((2, 6, 3), 3.0))  # tail only
    torch.testing.assert_close(losses.kl_to_teacher(student, top, labels, 2.0), torch.tensor(0.0))
    student.scatter_add_(-1, top.indices[..., :1], torch.ones(2, 6, 1))  # the top candidate up
    assert float(losses.kl_to_teacher(student, top, labels, 2.0)) > 0


def test_hidden_mse_ignores_padding():
    a = [torch.zeros(1, 4, 3) for _ in range(3)]
    b = [torch.zeros(1, 4, 3) for _ in range(3)]
    b[2][0, 3] = 10.0  # padding position
    assert float(losses.hidden_mse(a, b, torch.tensor([[1, 1, 1, 0]]))) == 0.0


def test_handshake_reports_every_differing_field():
    spec = Spec(1, 2, 16, 97, 0, 0, 0, 8)
    check_specs([spec, spec, spec], 0)
    with pytest.raises(ProtocolError, match=r"trainer 1 of group 3: batch: teacher 2, trainer 3; topk"):
        check_specs([spec, Spec(1, 3, 16, 97, 0, 0, 0, 0), spec], 3)


def test_layout_places_a_teacher_before_its_trainers():
    lay = Layout(groups=2, ranks_per_group=3)
    assert lay.world_size == 8
    assert [lay.role(r) for r in (0, 1, 3, 4, 7)] == [
        ("teacher", 0, -1), ("trainer", 0, 0), ("trainer", 0, 2), ("teacher", 1, -1), ("trainer", 1, 5)]
    assert lay.trainers() == [1, 2, 3, 5, 6, 7]


def _member(rank: int, port: int, batch: int, folder: str, q) -> None:
    """A process of a 2-process group: rank 0 serves a tiny teacher, rank 1 asks it once."""
    from datetime import timedelta

    import torch.distributed as dist

    from modelmake.distill.service import LocalTeacher, RemoteTeacher, TeacherServer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=30))
    model = tiny_llama(seed=1)
    spec = Spec(1, batch, 8, 97, 1, 3, 32, 5)
    try:
        if rank == 0:
            TeacherServer(model, Spec(1, 2, 8, 97, 1, 3, 32, 5), dist.group.WORLD, 0, 0, torch.device("cpu"),
                          Path(folder) / "group0.ready", {"port": port}, torch.float32).serve()
            q.put((rank, "served"))
        else:
            client = RemoteTeacher(spec, dist.group.WORLD, 0, 0, torch.device("cpu"), torch.float32)
            ids = torch.randint(3, 97, (batch, 8), generator=torch.Generator().manual_seed(0))
            mask = torch.ones_like(ids)
            (vals, idx), hid = client.outputs(ids, mask)
            (lv, li), lh = LocalTeacher(model, spec, torch.device("cpu"), torch.float32).outputs(ids, mask)
            client.close()
            same = torch.equal(idx, li) and torch.allclose(vals, lv) and torch.allclose(hid, lh)
            q.put((rank, f"same={same} hidden={tuple(hid.shape)}"))
    except ProtocolError as e:
        q.put((rank, f"ProtocolError: {e}"))
    finally:
        dist.destroy_process_group()


def run_pair(batch: int, tmp_path: Path) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_member, args=(r, port, batch, str(tmp_path), q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode is not None, "a group member hangs"
    return dict(q.get(timeout=5) for _ in procs)


@pytest.mark.slow
def test_remote_teacher_returns_what_the_teacher_computes_in_process(tmp_path):
    got = run_pair(batch=2, tmp_path=tmp_path)
    assert got == {0: "served", 1: "same=True hidden=(3, 2, 8, 32)"}
    assert not (tmp_path / "group0.ready").exists()  # removed at a clean shutdown


@pytest.mark.slow
def test_mismatched_batch_is_rejected_by_both_sides_not_deadlocked(tmp_path):
    got = run_pair(batch=3, tmp_path=tmp_path)
    assert got[0].startswith("ProtocolError") and got[1].startswith("ProtocolError")
    assert "batch: teacher 2, trainer 3" in got[1]


def fake_chunk_rwkv6(r, k, v, w, u, scale=None, initial_state=None, output_final_state=False, **_):
    """A FAKE of fla's ``chunk_rwkv6``, which needs a GPU: its documented contract (fla 0.6: r, k, v,
    w as [B, T, H, K] with w the log forget gate, u [H, K], o [B, T, H, V]) computed step by step in
    plain PyTorch, written from that contract alone. It checks the layout the student hands fla."""
    bsz, t, h, d = r.shape
    assert k.shape == v.shape == w.shape == (bsz, t, h, d) and u.shape == (h, d) and scale == 1.0
    s = torch.zeros(bsz, h, d, d, dtype=r.dtype)
    out = []
    for i in range(t):
        kv = k[:, i, :, :, None] * v[:, i, :, None, :]  # [B, H, K, V]
        out.append(torch.einsum("bhk,bhkv->bhv", r[:, i], s + u[None, :, :, None] * kv))
        s = torch.exp(w[:, i])[..., None] * s + kv
    return torch.stack(out, dim=1), None


def test_the_fla_call_follows_flas_layout(monkeypatch):
    """The fast path's layout, on the CPU: fla_rwkv6 through the fake above equals the recurrence
    (batch, heads, length and head size all differ, so a swapped axis fails)."""
    monkeypatch.setattr(hybrid, "chunk_rwkv6", fake_chunk_rwkv6)
    g = torch.Generator().manual_seed(0)
    b, h, t, d = 2, 3, 5, 4
    r, k, v = (torch.randn(b, h, t, d, generator=g) for _ in range(3))
    logw = -torch.rand(h, d, generator=g) - 0.05
    u = torch.randn(h, d, generator=g)
    want, _ = hybrid.recurrence(r, k, v, torch.exp(logw)[None, :, None, :].expand(b, -1, t, -1), u)
    torch.testing.assert_close(hybrid.fla_rwkv6(r, k, v, logw, u), want)


@pytest.mark.skipif(hybrid.chunk_rwkv6 is None or not torch.cuda.is_available(),
                    reason="flash-linear-attention is not installed / no GPU here: its Triton kernels need one")
def test_fla_fast_path_gives_the_pure_pytorch_outputs():
    student = hybrid.from_teacher(tiny_llama(), [0, 1]).cuda()
    ids = torch.randint(3, 97, (2, 33), device="cuda")
    with torch.no_grad():
        slow = student(input_ids=ids).logits
        for tm in student.time_mixes():
            tm.use_fla = True
        fast = student(input_ids=ids).logits
    torch.testing.assert_close(fast, slow, atol=2e-3, rtol=2e-3)


def test_web_data_reads_c4_json_gz_shards_with_raw_content(tmp_path, tokenizer):
    """distill.web.text_field: raw_content, the shards as C4 ships them (.json.gz), through build_web."""
    import gzip

    import pandas as pd

    from modelmake.errors import RecordError

    tokenizer.save_pretrained(tmp_path / "tok")
    shard = tmp_path / "c4-train.00000-of-01024.json.gz"
    shard.write_bytes(gzip.compress(b"\xef\xbb\xbf" + "".join(
        json.dumps({"raw_content": f"the moon {i} is far from us", "url": f"u{i}"}) + "\n" for i in range(40)
    ).encode()))
    counts = data.build_web({"en": [str(shard)]}, str(tmp_path / "tok"), str(tmp_path / "train.parquet"),
                            str(tmp_path / "eval.parquet"), max_len=16, eval_rows=2, seed=0, text_field="raw_content")
    assert counts["texts"] == {"en": 40} and counts["train"] > 0
    assert len(pd.read_parquet(tmp_path / "train.parquet")) == counts["train"]
    with pytest.raises(RecordError, match=r"json\.gz:1: no field 'text'.*distill\.web\.text_field"):
        data.read_web(shard)  # the default field, text, is not there: the message says which key to set
