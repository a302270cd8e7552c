"""ZeRO-3 consolidation on real DeepSpeed ZeRO-3 checkpoints made here on CPU (gloo), with one
training process and with two (torchrun, the command router_train runs: modelmake.launch; that run is
killed after its first checkpoint and resumed): the consolidated safetensors folder loads with
from_pretrained and holds exactly the trained weights.

The trained weights' reference is ``weights_digest.json``, written at the end of training from the
parameters gathered across the ZeRO-3 shards (``deepspeed.zero.GatheredParameters``), a path
independent of ``zero_to_fp32``, which reads the optimizer-state partitions from disk.
"""

from __future__ import annotations

import json

import pytest

from conftest import REPO
from test_router import DEMO, make_tiny_base
from test_scale import kill_after_first_checkpoint, launched, run_to_the_end

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from modelmake.router.data import SPLITS, write_splits

    root = tmp_path_factory.mktemp("zero3")
    base = make_tiny_base(root)
    raw = root / "scored.jsonl"
    raw.write_text("".join(DEMO.read_text().splitlines(keepends=True)[:60]))
    splits = {k: root / f"{k}.parquet" for k in SPLITS}
    write_splits([raw], splits, root / "stats.json", n_sample=None, calib=0.2, test=0.2, seed=0, config={})
    return root, base, splits


def train(root, base, splits, name: str, processes: int, kill: bool = False, **settings):
    """Train with ZeRO-3 on ``processes`` gloo processes; ``kill``: first killed after its first
    checkpoint (the launcher's process group, by PID), then rerun: return the output and that checkpoint."""
    out, ckpt = root / name / "zero3", root / name / "ckpt"
    settings = {"epochs": 1, "batch_size": 4, "lr": 0.01, "max_length": 512, "save_steps": 100, "logging_steps": 1,
                **settings}
    scale = {"processes": processes, "deepspeed": str(REPO / "config/router/zero3.json")}
    cmd = launched(scale, "router-train", "--train", str(splits["train"]), "--eval", str(splits["calib"]),
                   "--base", str(base), "--out", str(out), "--ckpt-dir", str(ckpt), "--settings", json.dumps(settings))
    (root / name).mkdir()
    killed_at = kill_after_first_checkpoint(cmd, ckpt, root / name / "killed.log", root) if kill else None
    run_to_the_end(cmd, root / name / "train.log", root)
    return (out, killed_at) if kill else out


def consolidate_and_check(zero3, out):
    import torch
    from transformers import AutoModelForCausalLM

    from modelmake.files import read_json
    from modelmake.router.consolidate import consolidate
    from modelmake.router.train import tensor_sha256

    digest = read_json(zero3 / "weights_digest.json")
    consolidate(zero3, out, config={})
    assert (out / "model.safetensors").is_file() and (out / "manifest.json").is_file()
    assert read_json(out / "provenance.json")["counts"]["verified_against_digest"] is True
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    params = dict(model.named_parameters())
    assert set(digest) == set(params)
    for name, rec in digest.items():
        assert tensor_sha256(params[name].to(getattr(torch, rec["dtype"]))) == rec["sha256"], name
    base = AutoModelForCausalLM.from_pretrained(zero3.parent.parent / "model")
    moved = [n for n, p in base.named_parameters() if n in params and p.shape == params[n].shape
             and not torch.equal(p, params[n])]
    assert moved, "training changed no weight"
    return model


def test_one_process_zero3_checkpoint_consolidates_to_the_trained_weights(setup):
    root, base, splits = setup
    zero3 = train(root, base, splits, "one", processes=1)
    assert sorted(p.name for p in (zero3 / "global_step9").iterdir()) == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    model = consolidate_and_check(zero3, root / "one" / "model")
    assert model.get_input_embeddings().weight.shape[0] == json.loads((zero3 / "config.json").read_text())["vocab_size"]


def test_two_process_zero3_run_killed_then_resumed_consolidates_to_the_trained_weights(setup):
    root, base, splits = setup
    # 2 epochs of 36 rows / (4 x 2 processes): 10 steps, a checkpoint every 2
    zero3, killed_at = train(root, base, splits, "two", processes=2, kill=True, epochs=2, save_steps=2)
    metrics = json.loads((zero3 / "metrics.json").read_text())
    assert metrics["resumed_from"] and int(metrics["resumed_from"].rsplit("-", 1)[1]) >= int(killed_at.split("-")[1])
    assert metrics["steps"] == 10
    step = next(zero3.glob("global_step*"))
    assert step.name == "global_step10"
    assert {p.name for p in step.glob("*optim_states.pt")} == {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    consolidate_and_check(zero3, root / "two" / "model")


def test_consolidation_refuses_weights_that_differ_from_the_trained_ones(setup, tmp_path):
    import shutil

    from modelmake.router.consolidate import ConsolidationError, consolidate

    root, _, _ = setup
    src = next(root.glob("*/zero3"))
    zero3 = tmp_path / "zero3"
    shutil.copytree(src, zero3)
    digest = json.loads((zero3 / "weights_digest.json").read_text())
    name = sorted(digest)[0]
    digest[name]["sha256"] = "0" * 64
    (zero3 / "weights_digest.json").write_text(json.dumps(digest))
    with pytest.raises(ConsolidationError, match=name):
        consolidate(zero3, tmp_path / "model", config={})
    assert not (tmp_path / "model").exists()
