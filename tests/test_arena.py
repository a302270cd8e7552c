"""Arena library promises: the input template's token budget, A/B swap symmetry, the soft
pseudo-label merge, the held-out fold, and a submission that reproduces the trained predictions.

A tiny random Llama classifier with a small BPE tokenizer stands in for a trained stage (seconds).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from modelmake.arena.data import fold_of, prepare, read_pairs, swap
from modelmake.arena.evaluate import ensemble, metrics
from modelmake.arena.pseudo import merge_soft_labels
from modelmake.arena.stages import check_no_leak, training_data
from modelmake.arena.template import TemplateSettings, build_input, fair_split, head_tail
from modelmake.errors import ConfigError, RecordError

from conftest import REPO

WORDS = "tea rain moon bread python list sleep river map clock music garden 绿茶 下雨 月亮 面包".split()


def pairs_frame(n: int = 12, seed: int = 0) -> pd.DataFrame:
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
        rows.append({"id": f"p{i}", "prompt": words(rng.randint(3, 12)), "response_a": words(rng.randint(1, 40)),
                     "response_b": words(rng.randint(1, 40)), "language": "en",
                     "winner": "model_a" if i % 2 else "model_b", "fold": i % 3})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    from modelmake.arena import template

    fixed = [template.INSTRUCTION, template.PROMPT_HEADER, template.A_HEADER, template.B_HEADER, template.VERDICT_CUE]
    tok.train_from_iterator((WORDS + fixed) * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    path = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(path)
    return fast


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, tokenizer):
    """A random tiny Llama sequence classifier folder, as a stage writes it (arena.json included)."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      num_labels=2, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    model = LlamaForSequenceClassification(cfg)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # predictions well away from 0.5
    path = tmp_path_factory.mktemp("clf") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "arena.json").write_text(json.dumps({"template": {"max_length": 96, "head_share": 0.5}}))
    return path


# --- the input template


def test_fair_split_gives_short_parts_all_and_shares_the_rest_equally():
    assert fair_split([5, 100, 100], 65) == [5, 30, 30]
    assert fair_split([5, 6, 7], 100) == [5, 6, 7]
    assert fair_split([100, 100, 100], 31) == [11, 10, 10]
    assert fair_split([0, 50, 3], 20) == [0, 17, 3]
    for lengths in ([1, 2, 300], [300, 300, 1], [40, 41, 42]):
        for budget in (0, 10, 80, 1000):
            keep = fair_split(lengths, budget)
            assert sum(keep) <= budget and all(0 <= k <= n for k, n in zip(keep, lengths))
            assert sum(keep) == min(budget, sum(lengths))


def test_head_tail_keeps_the_start_and_the_end():
    ids = list(range(100))
    assert head_tail(ids, 10, 0.5) == [0, 1, 2, 3, 4, 95, 96, 97, 98, 99]
    assert head_tail(ids, 10, 1.0) == list(range(10))
    assert head_tail(ids[:5], 10, 0.5) == ids[:5]


def test_truncation_budget_is_respected_and_split_fairly(tokenizer):
    ts = TemplateSettings(max_length=120, head_share=0.5)
    long = " ".join(["moon"] * 400)
    short = "tea"
    ids = build_input(tokenizer, long, long, short, ts)
    assert len(ids) <= ts.max_length
    text = tokenizer.decode(ids)
    assert text.rstrip().endswith("(A or B):"), "the verdict cue is the last token: the head reads it"
    # the long prompt did not starve the responses: response A keeps as many tokens as the prompt
    prompt_part = text.split("Prompt: ")[1].split("\nResponse A")[0]
    a_part = text.split("Response A: ")[1].split("\nResponse B")[0]
    assert abs(len(tokenizer(prompt_part)["input_ids"]) - len(tokenizer(a_part)["input_ids"])) <= 3
    assert short in text.split("Response B: ")[1]
    with pytest.raises(ValueError, match="max_length"):
        build_input(tokenizer, "a", "b", "c", TemplateSettings(max_length=20))


# --- data, folds and the held-out fold


def test_bad_record_is_reported_with_file_and_line(tmp_path):
    p = tmp_path / "pairs.jsonl"
    good = {"id": "x", "prompt": "p", "response_a": "a", "response_b": "b", "winner": "model_a", "language": "en"}
    p.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "y", "winner": "tie"}) + "\n")
    with pytest.raises(RecordError, match=r"pairs.jsonl:2: 'winner'"):
        read_pairs([p], labelled=True)


def test_pairs_and_prompts_from_csv_and_parquet_with_their_own_field_names(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from modelmake.arena.pairs import sample_prompts

    src = tmp_path / "pairs.csv"
    src.write_text("\ufeffid,prompt,answer_1,answer_2,winner,lang\r\nx,p,a,b,model_a,en\r\ny,q,c,d,model_b,zh\r\n")
    fields = {"response_a": "answer_1", "response_b": "answer_2", "language": "lang"}
    assert read_pairs([src], labelled=True, fields=fields) == [
        {"id": "x", "prompt": "p", "response_a": "a", "response_b": "b", "language": "en", "winner": "model_a"},
        {"id": "y", "prompt": "q", "response_a": "c", "response_b": "d", "language": "zh", "winner": "model_b"}]
    with pytest.raises(RecordError, match=r"pairs\.csv:row 1: no field 'response_a'.*arena\.fields\.response_a"):
        read_pairs([src], labelled=True)

    pool = tmp_path / "pool.parquet"
    pq.write_table(pa.Table.from_pylist([{"qid": f"q{i}", "question": f"prompt {i}", "language": "en"}
                                         for i in range(5)]), pool)
    sample_prompts(str(pool), 2, 0, str(tmp_path / "prompts.jsonl"), fields={"id": "qid", "prompt": "question"})
    picked = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    assert len(picked) == 2 and all(r["messages"][0]["content"].startswith("prompt ") for r in picked)


def test_folds_are_stable_per_id(tmp_path):
    src = REPO / "resources/demo/arena/labelled.jsonl"
    counts = prepare([src], tmp_path / "l.parquet", labelled=True, folds=5, config={})
    df = pd.read_parquet(tmp_path / "l.parquet")
    assert counts["rows"] == len(df) and set(df["fold"]) == set(range(5))
    assert all(fold_of(r, 5) == f for r, f in zip(df["id"], df["fold"]))
    assert set(df["language"]) == {"en", "zh"}


def test_validation_fold_never_reaches_training():
    df = pairs_frame(30)
    train, valid = training_data(df, [], valid_fold=1, label_smoothing=0.0)
    assert set(train["id"]).isdisjoint(valid["id"]) and (valid["id"].isin(df[df.fold == 1]["id"])).all()
    check_no_leak(train, valid, "stage1")
    # a pseudo-labelled copy of a validation pair, even swapped and renamed, is refused
    leaked = swap(valid.head(1)).assign(id="other", p_a=0.7)
    train2, valid2 = training_data(df, [leaked], valid_fold=1, label_smoothing=0.0)
    with pytest.raises(RecordError, match="validation pairs are in the training data"):
        check_no_leak(train2, valid2, "stage2")


# --- swap symmetry


def test_swap_twice_is_identity_and_swaps_the_winner():
    df = pairs_frame().assign(p_a=0.8, p_b=0.2)
    s = swap(df)
    assert (s["response_a"] == df["response_b"]).all() and (s["winner"] != df["winner"]).all()
    assert (s["p_a"] == 0.2).all()
    pd.testing.assert_frame_equal(swap(s), df)


def test_swapped_prediction_of_the_swapped_pair_is_the_prediction(classifier_dir, tmp_path):
    from modelmake.arena.model import load_classifier, load_tokenizer, predict
    from modelmake.arena.pseudo import predict_pairs

    tok = load_tokenizer(classifier_dir)
    model = load_classifier(classifier_dir, tok)
    ts = TemplateSettings(max_length=96)
    df = pairs_frame()
    p = predict(model, tok, df, ts)
    # reading the swapped pair in swapped order is reading the original: P(A' = B wins) = 1 - P(A wins)
    assert predict(model, tok, swap(df), ts, swap=True) == pytest.approx([1 - x for x in p], abs=1e-6)
    assert max(abs(x - 0.5) for x in p) > 0.01, "a constant model would make this test vacuous"
    # the pseudo-label prediction (original and swapped, averaged) is symmetric: swapping the pair
    # gives exactly 1 - P(A)
    df.to_parquet(tmp_path / "a.parquet")
    swap(df).to_parquet(tmp_path / "b.parquet")
    predict_pairs(str(classifier_dir), str(tmp_path / "a.parquet"), str(tmp_path / "pa.parquet"))
    predict_pairs(str(classifier_dir), str(tmp_path / "b.parquet"), str(tmp_path / "pb.parquet"))
    pa, pb = pd.read_parquet(tmp_path / "pa.parquet"), pd.read_parquet(tmp_path / "pb.parquet")
    assert list(pa["p_a"]) == pytest.approx(list(1 - pb["p_a"]), abs=1e-6)


# --- soft-label merge and ensemble


def test_soft_label_merge_weights_and_margin():
    pairs = pairs_frame(4).drop(columns=["winner", "fold"])
    preds = {"m1": pd.DataFrame({"id": ["p3", "p2", "p1", "p0"], "p_a": [0.9, 0.5, 0.1, 0.6]}),
             "m2": pd.DataFrame({"id": ["p0", "p1", "p2", "p3"], "p_a": [0.2, 0.1, 0.5, 0.9]})}
    kept, stats = merge_soft_labels(pairs, preds, {"m1": 3, "m2": 1}, margin=0.2)
    # p0: .75*.6 + .25*.2 = .5 (dropped), p1: .1 (kept), p2: .5 (dropped), p3: .9 (kept)
    assert list(kept["id"]) == ["p1", "p3"]
    assert list(kept["p_a"]) == pytest.approx([0.1, 0.9])
    assert list(kept["p_a"] + kept["p_b"]) == pytest.approx([1, 1])
    assert stats["dropped_below_margin"] == 2 and stats["weights"] == {"m1": 0.75, "m2": 0.25}
    with pytest.raises(ConfigError, match="no weight for m2"):
        merge_soft_labels(pairs, preds, {"m1": 1}, margin=0.2)
    with pytest.raises(RecordError, match="miss 1 pairs"):
        merge_soft_labels(pairs, {"m1": preds["m1"].head(3)}, {"m1": 1}, margin=0.2)


def test_ensemble_keeps_confident_rows_and_blends_the_rest():
    out = ensemble([0.9, 0.55, 0.2], [0.1, 0.95, 0.4], weights=[3, 1], confident_margin=0.5)
    assert out == pytest.approx([0.9, 0.75 * 0.55 + 0.25 * 0.95, 0.2])


def test_metrics_log_loss_and_accuracy():
    m = metrics([0.8, 0.3, 0.5], ["model_a", "model_a", "model_b"])
    assert m["accuracy"] == pytest.approx(1 / 3)
    import math

    assert m["log_loss"] == pytest.approx(-(math.log(0.8) + math.log(0.3) + math.log(0.5)) / 3, abs=1e-5)


# --- export


@pytest.mark.slow  # runs the submission's predict.py three times (a fresh torch import each)
def test_export_reproduces_the_validation_predictions(classifier_dir, tmp_path):
    from modelmake.arena.export import ExportError, export_model
    from modelmake.arena.model import load_classifier, load_tokenizer, predict

    df = pairs_frame(15)
    df.to_parquet(tmp_path / "labelled.parquet")
    valid = df[df["fold"] == 0].reset_index(drop=True)
    tok = load_tokenizer(classifier_dir)
    p = predict(load_classifier(classifier_dir, tok), tok, valid, TemplateSettings(max_length=96))
    valid.assign(p_a=p).to_parquet(tmp_path / "eval.parquet")
    out = tmp_path / "submission"
    check = export_model(str(classifier_dir), str(tmp_path / "labelled.parquet"), 0, str(tmp_path / "eval.parquet"),
                         str(out), tolerance=0.02)
    assert check["max_abs_diff_vs_trained"] <= 0.02
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float16"}
    assert (out / "manifest.json").exists() and (out / "tokenizer.json").exists()
    # the entry point stands alone (no modelmake on the path) and gives the same numbers again
    valid.to_parquet(tmp_path / "valid.parquet")
    subprocess.run([sys.executable, str(out / "predict.py"), "--input", str(tmp_path / "valid.parquet"),
                    "--out", str(tmp_path / "again.parquet")], check=True, env={"PATH": "/usr/bin:/bin"})
    again = pd.read_parquet(tmp_path / "again.parquet")
    assert list(again["p_a"]) == pytest.approx(list(pd.read_parquet(out / "valid_predictions.parquet")["p_a"]),
                                               abs=1e-7)
    # a submission that does not match the trained predictions fails the export
    valid.assign(p_a=[1 - x for x in p]).to_parquet(tmp_path / "wrong.parquet")
    with pytest.raises(ExportError, match="differ from the trained model"):
        export_model(str(classifier_dir), str(tmp_path / "labelled.parquet"), 0, str(tmp_path / "wrong.parquet"),
                     str(tmp_path / "bad"), tolerance=0.02)
    assert not (tmp_path / "bad").exists()


def test_config_cross_checks_name_the_key():
    from conftest import demo_config

    from modelmake.config import validate
    from modelmake.errors import ConfigError

    c = demo_config()
    c["arena"].update(bases=["arena_a", "nope"], valid_fold=7, folds=5)
    c["arena"]["template"] = {"max_length": 160}
    with pytest.raises(ConfigError) as e:
        validate(c, check_paths=False)
    problems = str(e.value).splitlines()
    assert any("arena.bases[1]: 'nope' is not a key of models" in p for p in problems)
    assert any("arena.valid_fold: 7" in p for p in problems)
    assert any("arena.pseudo.weights: no weight for base 'nope'" in p for p in problems)


def test_dry_run_plans_every_arena_step(tmp_path):
    from conftest import run_snakemake, small_config, write_config
    from test_workflow_dry import jobs_planned

    write_config(tmp_path, small_config(tmp_path))
    planned = jobs_planned(run_snakemake(tmp_path, "-n", str(tmp_path / "results/arena/demo/eval/metrics.tsv")).stdout)
    assert {k: v for k, v in planned.items() if k.startswith("arena")} == {
        "arena_prepare": 1, "arena_sample_prompts": 1, "arena_generate": 2, "arena_pairs": 1,
        "arena_train": 6, "arena_predict": 4, "arena_merge_pseudo": 2, "arena_export": 2,
        "arena_export_ensemble": 1, "arena_report": 1,
    }
