"""The router pipeline's library without a training run (seconds): data, tokens and masking,
label-token scoring, calibration, APGR / CPT.

A tiny demo tokenizer (BPE trained on a few sentences, the project's chat template) and a tiny
random Llama are built once per module in a temporary folder.
"""

from __future__ import annotations

import json
import math
import re

import pytest

from conftest import REPO
from modelmake.errors import RecordError, UserError
from modelmake.router.data import read_scored, split_records
from modelmake.router.evaluate import apgr, cpt, curve, evaluate_scores, random_curve
from modelmake.router.route import calibrate_threshold, calibration_record, decide
from modelmake.router.tokens import LABEL_TOKENS, ROUTER_JSON, add_label_tokens, label_of, prompt_messages

DEMO = REPO / "resources/demo/router/scored_prompts.jsonl"
SYSTEM = "[Instruction]\nPredict the score."


def conversation(prompt: str, k: int) -> list[dict]:
    return prompt_messages(prompt, SYSTEM) + [{"role": "assistant", "content": f"[[{k}]]"}]


def make_tiny_base(root, hidden: int = 32, layers: int = 1):
    """A tiny random Llama with a demo tokenizer (BPE on demo prompts, no label tokens yet): root/model."""
    import pandas as pd
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from modelmake.assets import build_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    texts = [r["prompt"] for r in map(json.loads, DEMO.read_text().splitlines()[:200])]
    corpus = root / "corpus.parquet"
    pd.DataFrame({"messages": [[{"role": "user", "content": t}] for t in texts]}).to_parquet(corpus)
    build_tokenizer([corpus], root / "tok", vocab_size=400)
    tok = AutoTokenizer.from_pretrained(root / "tok")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_base(tmp_path_factory.mktemp("router_base"))


@pytest.fixture(scope="module")
def router_dir(base, tmp_path_factory):
    """The base with label tokens added and router.json: a (random) router model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("router") / "model"
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    ids = add_label_tokens(tok, model)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / ROUTER_JSON).write_text(json.dumps({"system": SYSTEM, "label_tokens": LABEL_TOKENS, "label_token_ids": ids}))
    return out


# --- data


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def record(i, k=3, **kw):
    return {"id": f"x{i}", "prompt": f"question {i}", "messages": conversation(f"question {i}", k),
            "weak_score": 2, "strong_score": 5, **kw}


def test_demo_prompts_validate_and_every_label_occurs():
    recs = read_scored([DEMO])
    assert len(recs) == 1000
    assert {r["label"] for r in recs} == {1, 2, 3, 4, 5}
    assert all(r["weak_score"] == r["label"] for r in recs)


@pytest.mark.parametrize("bad, message", [
    ("{not json", "bad JSON"),
    ({"prompt": "q", "messages": [{"role": "user", "content": "[Question]\nq\n\nPrediction:\n"}]}, "messages"),
    (dict(record(9), messages=conversation("q", 3)[:2] + [{"role": "assistant", "content": "4"}]), "[[1]]..[[5]]"),
    (dict(record(9), weak_score="high"), "weak_score"),
    (record(0), "duplicate id"),
])
def test_a_bad_record_is_reported_with_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path / "in.jsonl", [record(0), record(1), bad])
    with pytest.raises(RecordError) as e:
        read_scored([path])
    assert f"{path}:3" in str(e.value) and message in str(e.value)


def test_subsample_is_seeded_and_the_splits_are_disjoint():
    recs = read_scored([DEMO])
    a = split_records(recs, 500, 0.2, 0.2, seed=1)
    b = split_records(recs, 500, 0.2, 0.2, seed=1)
    c = split_records(recs, 500, 0.2, 0.2, seed=2)
    ids = {k: [r["id"] for r in v] for k, v in a.items()}
    assert ids == {k: [r["id"] for r in v] for k, v in b.items()}
    assert ids["train"] != [r["id"] for r in c["train"]]
    assert (len(ids["calib"]), len(ids["test"]), len(ids["train"])) == (100, 100, 300)
    assert not set(ids["train"]) & set(ids["test"]) and not set(ids["calib"]) & set(ids["test"])


def test_evaluation_splits_need_both_models_scores(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [record(i, weak_score=None) for i in range(10)])
    with pytest.raises(UserError, match="weak_score / strong_score"):
        split_records(read_scored([path]), None, 0.2, 0.2, seed=0)


# --- tokens and masking


def test_label_tokens_are_added_as_single_special_tokens_and_embeddings_resized(base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    before = len(tok)
    ids = add_label_tokens(tok, model)
    assert len(tok) == before + 5 == model.get_input_embeddings().weight.shape[0]
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    assert ids == list(range(before, before + 5))
    assert all(t in tok.all_special_tokens for t in LABEL_TOKENS)
    assert tok.encode("[[4]]", add_special_tokens=False) == [ids[3]]
    assert add_label_tokens(tok, model) == ids and len(tok) == before + 5  # idempotent
    assert label_of(" [[5]] ") == 5 and label_of("[[6]]") is None and label_of("[[5]] and more") is None


def test_sft_examples_train_on_the_answer_and_eos_only(base, tmp_path):
    """TRL's batches from the router's tokenized examples: labels are [[k]] then EOS; the rest is masked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from modelmake.router.train import sft_dataset

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    ids = add_label_tokens(tok, model)
    convs = [conversation("Prove that there are infinitely many primes.", 2), conversation("Hi there!", 5)]
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_length=128, report_to=[], use_cpu=True,
                     per_device_train_batch_size=2)
    trainer = SFTTrainer(model=model, args=args, train_dataset=sft_dataset(tok, convs, 128), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    for row, k in enumerate([2, 5]):
        labels = batch["labels"][row]
        trained = labels[labels != -100].tolist()
        assert trained == [ids[k - 1], tok.eos_token_id]
        seq = batch["input_ids"][row][batch["attention_mask"][row] == 1].tolist()
        assert seq[-2:] == [ids[k - 1], tok.eos_token_id]  # the example ends with EOS after the label
        assert "[Question]" in tok.decode(seq) and "Predict the score" in tok.decode(seq)


def test_a_template_without_generation_markers_gives_the_same_examples(base):
    from transformers import AutoTokenizer

    from modelmake.router.train import sft_dataset

    tok = AutoTokenizer.from_pretrained(base)
    add_label_tokens(tok)
    convs = [conversation("q", 3), conversation("Hi there!", 5)]
    marked = sft_dataset(tok, convs, 128).to_dict()
    tok.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert sft_dataset(tok, convs, 128).to_dict() == marked


class Configured(Exception):
    """Raised by a stand-in SFTConfig: what the trainer was configured with, no training."""


@pytest.mark.parametrize("schema_lr", [None, 0.123])
def test_train_router_without_settings_trains_with_the_schemas_defaults(base, tmp_path, monkeypatch, schema_lr):
    """train_router given no settings takes every value from the schema's router.train defaults,
    and sees a change of them (schema_lr: the schema's lr patched)."""
    import copy

    import pandas as pd
    import trl

    from modelmake import config as cfg
    from modelmake.router.train import train_router

    if schema_lr is not None:
        root = copy.deepcopy(cfg.schema())
        root["properties"]["router"]["properties"]["train"]["properties"]["lr"]["default"] = schema_lr
        monkeypatch.setattr(cfg, "schema", lambda: root)

    def configured(**kwargs):
        raise Configured(kwargs)

    monkeypatch.setattr(trl, "SFTConfig", configured)
    df = pd.DataFrame({"messages": [conversation(f"question {i}", 3) for i in range(4)], "system": SYSTEM})
    df.to_parquet(tmp_path / "train.parquet")
    with pytest.raises(Configured) as got:
        train_router(tmp_path / "train.parquet", tmp_path / "train.parquet", base, tmp_path / "out", tmp_path / "ckpt",
                     settings={}, seed=0, config={})
    args = got.value.args[0]
    want, scale = cfg.defaults("router.train"), cfg.defaults("$defs.scale")
    assert args["learning_rate"] == (schema_lr or want["lr"])
    assert (args["num_train_epochs"], args["per_device_train_batch_size"], args["gradient_accumulation_steps"],
            args["max_length"], args["warmup_steps"], args["weight_decay"], args["save_steps"], args["logging_steps"],
            args["bf16"], args["gradient_checkpointing"], args["use_cpu"]) == (
        want["epochs"], want["batch_size"], want["grad_accum"], want["max_length"], want["warmup_ratio"],
        want["weight_decay"], want["save_steps"], want["logging_steps"], scale["precision"] == "bf16",
        scale["gradient_checkpointing"], not scale["gpu"])


# --- scoring


def test_scores_are_the_label_token_logits_at_the_answer_position(router_dir):
    """Batched, left-padded scores equal a one-prompt forward pass's softmax over the five label
    logits at the last position (the assistant header's end), for prompts of different lengths."""
    import torch

    from modelmake.router.score import RouterModel, score_prompts

    prompts = ["Hi!", "Write a Python function that merges two sorted lists. Include examples. Explain each step.",
               "What is the capital of Peru?"]
    router = RouterModel(router_dir)
    df = score_prompts(router, prompts, batch_size=2)
    for i, p in enumerate(prompts):
        text = router.tokenizer.apply_chat_template(prompt_messages(p, SYSTEM), tokenize=False,
                                                    add_generation_prompt=True)
        assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
        ids = router.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits = router.model(input_ids=ids).logits[0, -1]
        expected = torch.softmax(logits[router.label_ids], dim=-1)
        got = torch.tensor(df.loc[i, ["p1", "p2", "p3", "p4", "p5"]].to_numpy(dtype="float32"))
        assert torch.allclose(got, expected, atol=1e-5)
        assert df.loc[i, "p_weak_ok"] == pytest.approx(float(expected[3] + expected[4]), abs=1e-5)
        assert df.loc[i, "expected_score"] == pytest.approx(float((expected * torch.arange(1, 6)).sum()), abs=1e-4)


def test_scoring_follows_the_label_logits(router_dir, tmp_path):
    """Raise the [[5]] row of the output embedding: P([[5]]) and P(weak ok) go up for every prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    from modelmake.router.score import RouterModel, score_prompts

    prompts = ["Hi!", "Prove that the square root of 2 is irrational."]
    before = score_prompts(RouterModel(router_dir), prompts)
    router = RouterModel(router_dir)
    model: AutoModelForCausalLM = router.model
    with torch.no_grad():
        h = model.lm_head.weight
        h.data = h.data.clone()  # untie from the input embedding: change only the output logits
        model.lm_head.weight = torch.nn.Parameter(h.data)
        hidden = []
        model.model.norm.register_forward_hook(lambda m, i, o: hidden.append(o[:, -1]))
        score_prompts(router, prompts)
        direction = torch.nn.functional.normalize(hidden[0].mean(0), dim=0)
        model.lm_head.weight[router.label_ids[4]] += 50 * direction
    after = score_prompts(router, prompts)
    assert (after["p5"] > before["p5"] + 0.2).all() and (after["p_weak_ok"] > before["p_weak_ok"]).all()


# --- routing and evaluation


def test_calibrated_threshold_sends_the_target_share_to_the_strong_model():
    ref = [i / 100 for i in range(100)]
    for share in (0.0, 0.2, 0.5, 0.8, 1.0):
        t = calibrate_threshold(ref, share)
        assert decide(ref, t).count("strong") == round(100 * share)
    cal = calibration_record(ref, [0.25], reference="ref")
    assert cal["thresholds"][0]["reference_strong_share"] == 0.25
    with pytest.raises(UserError):
        calibrate_threshold(ref, 1.5)


def test_apgr_and_cpt_on_a_hand_made_case():
    """Four prompts; the router ranks them by p_weak_ok: d (0.1), c (0.2), b (0.7), a (0.9).

    weak quality  a=1 b=1 c=0 d=0 -> 0.5; strong quality 1 everywhere -> 1.
    Routing d, then c, to the strong model fixes both failures: quality at share 0, 1/4, 2/4, 3/4, 1
    is 0.5, 0.75, 1, 1, 1. Area (trapezoids) = 1/4 * (0.625 + 0.875 + 1 + 1) = 0.875;
    APGR = (0.875 - 0.5) / (1 - 0.5) = 0.75. CPT(50%): quality 0.75 is first reached at share 1/4;
    CPT(80%): 0.9 lies between 0.75 (1/4) and 1 (2/4): 1/4 + 0.6 * 1/4 = 0.4.
    """
    scores, weak, strong = [0.9, 0.7, 0.2, 0.1], [1, 1, 0, 0], [1, 1, 1, 1]
    pts = curve(scores, weak, strong, points=4)
    assert [(p["strong_share"], p["quality"]) for p in pts] == [(0, 0.5), (0.25, 0.75), (0.5, 1), (0.75, 1), (1, 1)]
    assert apgr(pts, 0.5, 1.0) == pytest.approx(0.75)
    assert cpt(pts, 0.5, 1.0, 0.5) == pytest.approx(0.25)
    assert cpt(pts, 0.5, 1.0, 0.8) == pytest.approx(0.4)
    rnd = random_curve(weak, strong, points=4)
    assert apgr(rnd, 0.5, 1.0) == pytest.approx(0.5) and cpt(rnd, 0.5, 1.0, 0.8) == pytest.approx(0.8)
    # a router ranking backwards never does better than random
    backwards = curve([-s for s in scores], weak, strong, points=4)
    assert apgr(backwards, 0.5, 1.0) == pytest.approx(0.25)


def test_evaluation_reports_router_random_and_optimal_with_calibrated_points():
    import pandas as pd

    df = pd.DataFrame({"p_weak_ok": [0.9, 0.7, 0.2, 0.1], "expected_score": [4.5, 4, 2, 1.5],
                       "weak_score": [1, 1, 0, 0], "strong_score": [1, 1, 1, 1]})
    cal = calibration_record([0.9, 0.7, 0.2, 0.1], [0.5], reference="test")
    m = evaluate_scores(df, points=4, calibration=cal)
    assert set(m["methods"]) == {"router", "random", "optimal", "router_expected_score"}
    assert m["methods"]["router"]["APGR"] == pytest.approx(0.75)
    assert m["methods"]["optimal"]["APGR"] >= m["methods"]["router"]["APGR"]
    assert m["calibrated"][0]["test_strong_share"] == 0.5 and m["calibrated"][0]["test_PGR"] == 1.0
    with pytest.raises(UserError, match="no gap"):
        evaluate_scores(df.assign(strong_score=0), points=4)
    assert not math.isnan(m["methods"]["random"]["CPT(50%)"])


# --- the workflow, planned only


def test_dry_run_plans_every_router_step_once(tmp_path):
    from conftest import run_snakemake, small_config, write_config
    from test_workflow_dry import jobs_planned

    write_config(tmp_path, small_config(tmp_path))  # the demo trains without DeepSpeed
    planned = jobs_planned(run_snakemake(tmp_path, "-n").stdout)
    assert {k: v for k, v in planned.items() if k.startswith("router_")} == {
        "router_data": 1, "router_train": 1, "router_score": 2, "router_calibrate": 1, "router_evaluate": 1}


def test_with_zero3_the_checkpoint_is_consolidated_into_the_model(tmp_path):
    from conftest import run_snakemake, small_config, write_config
    from test_workflow_dry import jobs_planned

    write_config(tmp_path, small_config(tmp_path, **{"router.scale.deepspeed": str(REPO / "config/router/zero3.json")}))
    out = run_snakemake(tmp_path, "-n", str(tmp_path / "results/router/demo/model")).stdout
    assert jobs_planned(out) == {"router_data": 1, "router_train": 1, "router_consolidate": 1, "reformat": 2,
                                 "build_tokenizer": 1, "build_model": 1}
    assert "results/router/demo/zero3" in out


def test_config_errors_name_the_router_key(tmp_path):
    from conftest import run_snakemake, small_config, write_config

    write_config(tmp_path, small_config(tmp_path, **{"router.base": "nope", "router.split": {"calib": 0.5, "test": 0.5}}))
    out = run_snakemake(tmp_path, "-n", check=False).stdout
    assert "router.base: 'nope' is not a key of models" in out and "router.split: calib + test" in out


def test_scored_prompts_in_parquet_with_other_field_names(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": r["prompt"], "messages": r["messages"], "score_8b": r["weak_score"], "score_70b": "5"}
            for r in map(json.loads, DEMO.read_text().splitlines()[:5])]
    src = tmp_path / "scored.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    recs = read_scored([src], {"prompt": "question", "weak_score": "score_8b", "strong_score": "score_70b"})
    assert [r["prompt"] for r in recs] == [r["question"] for r in rows]
    assert [r["strong_score"] for r in recs] == [5.0] * 5  # a number written as text (CSV) is a number
    with pytest.raises(RecordError, match=re.escape(f"{src}:row 1: no field 'prompt'") + ".*router.fields.prompt"):
        read_scored([src])
