"""NnPUKTOTrainer: its compute_loss is the nnPU loss of the policy's and reference's sequence
log-probabilities, tokenised with the model's own chat template (checked against an independent
computation), and a short real training run saves a complete model folder."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow  # imports TRL and trains a tiny model (~20 s)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import pandas as pd

    from test_scale import tiny_llama_folder

    root = tmp_path_factory.mktemp("sp_trainer")
    convs = [[{"role": "user", "content": f"question {i} about topic {i % 5}?"},
              {"role": "assistant", "content": f"answer {i}: topic {i % 5} is simple."}] for i in range(40)]
    tiny_llama_folder(root, convs, hidden=64, max_len=128)
    rows = []
    for i in range(8):
        prompt = [{"role": "user", "content": f"question {i} about topic {i % 5}?"}]
        rows.append({"id": str(i), "prompt": prompt, "completion": [{"role": "assistant", "content": f"answer {i}"}],
                     "label": True, "source": "real"})
        rows.append({"id": str(i), "prompt": prompt, "completion": [{"role": "assistant", "content": "no idea"}],
                     "label": False, "source": "generated"})
    pd.DataFrame(rows).to_parquet(root / "kto.parquet")
    return root


def test_compute_loss_is_the_nnpu_loss_of_the_sequence_logps(tiny):
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig

    from modelmake.selfplay.evaluate import sequence_logps
    from modelmake.selfplay.loss import nnpu_kto_loss
    from modelmake.selfplay.train import nnpu_kto_trainer

    tok = AutoTokenizer.from_pretrained(tiny / "model")
    policy = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32)
    with torch.no_grad():  # move the policy away from the reference
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ds = datasets.load_dataset("parquet", data_files=str(tiny / "kto.parquet"), split="train")
    rows = ds.to_list()
    ds = ds.remove_columns(["id", "source"])
    args = KTOConfig(output_dir=str(tiny / "ckpt"), use_cpu=True, bf16=False, gradient_checkpointing=False,
                     loss_type="apo_zero_unpaired", beta=0.5, per_device_train_batch_size=16, report_to=[],
                     max_length=128)
    trainer = nnpu_kto_trainer(model=policy, ref_model=ref, args=args, train_dataset=ds, processing_class=tok,
                               prior=0.3, gamma=1.0)
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(trainer.model, batch)
    lp = torch.tensor([s for s, _ in sequence_logps(policy, tok, rows, 128)])
    lr = torch.tensor([s for s, _ in sequence_logps(ref, tok, rows, 128)])
    expected = nnpu_kto_loss(lp, lr, [r["label"] for r in rows], beta=0.5, prior=0.3)
    assert loss.item() == pytest.approx(expected.loss.item(), abs=1e-4)
    assert loss.requires_grad


class Killed(Exception):
    pass


def killed_run(monkeypatch, dataset, start, out, ckpt, settings):
    """An iteration killed after its last checkpoint, before its model folder was saved: what a
    killed job leaves in the checkpoint folder (complete ``checkpoint-N``, and whatever the trainer
    records beside it)."""
    import modelmake.training
    from modelmake.selfplay.train import train_iteration

    def kill(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(modelmake.training, "save_model_folder", kill)
        with pytest.raises(Killed):
            train_iteration(dataset, start, out, ckpt_dir=ckpt, settings=settings, seed=0,
                            loss_png=out.parent / "loss.png")
    done = sorted(ckpt.glob("checkpoint-*/trainer_state.json"))
    assert done, "the killed run left no complete checkpoint"
    return done[-1].parent


def kto_rows(n_ids: int, answer: str = "answer") -> list[dict]:
    rows = []
    for i in range(n_ids):
        prompt = [{"role": "user", "content": f"question {i} about topic {i % 5}?"}]
        rows.append({"id": str(i), "prompt": prompt, "completion": [{"role": "assistant", "content": f"{answer} {i}"}],
                     "label": True, "source": "real"})
        rows.append({"id": str(i), "prompt": prompt, "completion": [{"role": "assistant", "content": "no idea"}],
                     "label": False, "source": "generated"})
    return rows


def test_training_an_iteration_saves_a_complete_model_and_resumes_nothing_stale(tiny, monkeypatch):
    from modelmake.selfplay.train import train_iteration

    settings = {"beta": 0.1, "prior": 0.3, "learning_rate": 1e-3, "epochs": 1, "batch_size": 4, "save_steps": 2}
    ckpt = tiny / "it0" / "ckpt"
    # a complete stale checkpoint of other settings: batch 2 makes 8 steps, so it is checkpoint-8
    stale = killed_run(monkeypatch, tiny / "kto.parquet", tiny / "model", tiny / "it0" / "model", ckpt,
                       {**settings, "batch_size": 2})
    assert stale.name == "checkpoint-8"
    counts = train_iteration(tiny / "kto.parquet", tiny / "model", tiny / "it0" / "model", ckpt_dir=ckpt,
                             settings=settings, seed=0, loss_png=tiny / "it0" / "loss.png")
    assert counts["steps"] == 4  # 16 rows / 4 from step 0: the stale checkpoint was not resumed
    manifest = json.loads((tiny / "it0" / "model" / "manifest.json").read_text())
    assert "model.safetensors" in manifest and "tokenizer_config.json" in manifest
    assert not ckpt.exists()
    assert (tiny / "it0" / "loss.png").read_bytes().startswith(b"\x89PNG")


def test_killed_iteration_rerun_after_its_data_changed_does_not_resume_the_old_checkpoint(tiny, monkeypatch):
    import pandas as pd

    from modelmake.selfplay.train import train_iteration

    settings = {"beta": 0.1, "prior": 0.3, "learning_rate": 1e-3, "epochs": 1, "batch_size": 4, "save_steps": 2}
    root = tiny / "it1"
    root.mkdir()
    data, ckpt, out = root / "train.parquet", root / "ckpt", root / "model"
    pd.DataFrame(kto_rows(8)).to_parquet(data)  # 16 rows: 4 steps, killed with checkpoint-4
    assert killed_run(monkeypatch, data, tiny / "model", out, ckpt, settings).name == "checkpoint-4"
    # the previous step reran with other results: new data at the same path (8 rows: 2 steps)
    pd.DataFrame(kto_rows(4, answer="another answer")).to_parquet(data)
    counts = train_iteration(data, tiny / "model", out, ckpt_dir=ckpt, settings=settings, seed=0,
                             loss_png=root / "loss.png")
    assert counts["steps"] == 2  # 8 rows / 4 from step 0, not the old data's checkpoint-4
    assert counts["examples"] == 8


class Configured(Exception):
    """Raised by a stand-in KTOConfig or trainer: what the iteration was configured with, no training."""


@pytest.mark.parametrize("schema_beta", [None, 0.77])
def test_an_iteration_without_settings_trains_with_the_schemas_defaults(tiny, monkeypatch, schema_beta):
    """train_iteration given no settings takes every value from the schema's $defs/selfplay_train
    defaults, and sees a change of them (schema_beta: the schema's beta patched)."""
    import copy

    import trl

    import modelmake.selfplay.train as sp_train
    from modelmake import config as cfg

    if schema_beta is not None:
        root = copy.deepcopy(cfg.schema())
        root["$defs"]["selfplay_train"]["properties"]["beta"]["default"] = schema_beta
        monkeypatch.setattr(cfg, "schema", lambda: root)
    monkeypatch.setattr(trl, "KTOConfig", lambda **kwargs: kwargs)

    def trainer(**kwargs):
        raise Configured(kwargs)

    monkeypatch.setattr(sp_train, "nnpu_kto_trainer", trainer)
    with pytest.raises(Configured) as got:
        sp_train.train_iteration(tiny / "kto.parquet", tiny / "model", tiny / "d" / "model", ckpt_dir=tiny / "d" / "ckpt",
                                 settings={}, seed=0, loss_png=tiny / "d" / "loss.png")
    args, want = got.value.args[0], cfg.defaults("$defs.selfplay_train")
    assert args["args"]["beta"] == (schema_beta or want["beta"])
    assert (args["prior"], args["gamma"]) == (want["prior"], want["gamma"])
    kto = args["args"]
    assert (kto["learning_rate"], kto["num_train_epochs"], kto["per_device_train_batch_size"], kto["max_length"],
            kto["desirable_weight"], kto["undesirable_weight"], kto["save_steps"]) == (
        want["learning_rate"], want["epochs"], want["batch_size"], want["max_length"], want["desirable_weight"],
        want["undesirable_weight"], want["save_steps"])


def test_a_settings_key_the_schema_does_not_list_is_refused(tiny):
    from modelmake.errors import UserError
    from modelmake.selfplay.train import train_iteration

    with pytest.raises(UserError, match=r"selfplay.train: unknown keys \['lr'\]; allowed: \[.*'learning_rate'"):
        train_iteration(tiny / "kto.parquet", tiny / "model", tiny / "e" / "model", ckpt_dir=tiny / "e" / "ckpt",
                        settings={"lr": 0.1}, seed=0, loss_png=tiny / "e" / "loss.png")
