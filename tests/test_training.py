"""training.py's checkpoint state and model folders: the one key and marker every training pipeline
(router, arena, self-play, distillation) uses to decide whether a killed run's checkpoints may be
resumed, and the one way a model folder is finished. No torch here: fast."""

from __future__ import annotations

import json
import threading

import pytest

import modelmake.files as files
import modelmake.training as training
from modelmake.training import (
    CHECKPOINT_MARKER, MANIFEST, checkpoint_key, finish_model_folder, input_digest, new_model_folder,
    prepare_checkpoint_dir,
)


def complete_checkpoint(ckpt, step: int):
    folder = ckpt / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def model_folder(path, weights: bytes = b"w" * 1000):
    tmp = new_model_folder(path)
    (tmp / "model.safetensors").write_bytes(weights)
    (tmp / "config.json").write_text("{}")
    return finish_model_folder(tmp, path, config={"made": "here"})


# --- the key


def test_same_settings_and_contents_give_the_same_key_wherever_the_inputs_lie(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "train.parquet").write_bytes(b"rows")
    a, b = tmp_path / "a/train.parquet", tmp_path / "b/train.parquet"
    assert checkpoint_key({"lr": 1, "seed": 0}, [a]) == checkpoint_key({"seed": 0, "lr": 1}, [str(b)])
    assert checkpoint_key({"lr": 1}, [a]) != checkpoint_key({"lr": 2}, [a])


def test_new_bytes_at_the_same_path_change_the_key(tmp_path):
    data = tmp_path / "train.parquet"
    data.write_bytes(b"old rows")
    before = checkpoint_key({"lr": 1}, [data])
    data.write_bytes(b"new rows")
    assert checkpoint_key({"lr": 1}, [data]) != before


def test_the_order_of_the_inputs_is_part_of_the_key(tmp_path):
    (tmp_path / "x").write_bytes(b"x")
    (tmp_path / "y").write_bytes(b"y")
    x, y = tmp_path / "x", tmp_path / "y"
    assert checkpoint_key({}, [x, y]) != checkpoint_key({}, [y, x])


def test_a_model_folder_is_keyed_by_its_manifest_without_rehashing_its_files(tmp_path, monkeypatch):
    first = model_folder(tmp_path / "m1")
    other = model_folder(tmp_path / "m2", weights=b"v" * 1000)

    def no_rehash(*args, **kwargs):
        raise AssertionError("a model folder with a manifest was hashed again")

    monkeypatch.setattr(files, "sha256_tree", no_rehash)  # files.content_digest does the hashing
    monkeypatch.setattr(files, "sha256_file", no_rehash)
    assert input_digest(first) == training._json_digest(json.loads((first / MANIFEST).read_text()))
    assert checkpoint_key({}, [first]) != checkpoint_key({}, [other])  # other weights, other manifest


def test_a_folder_without_manifest_is_keyed_by_its_files(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    before = input_digest(base)
    (base / "config.json").write_text('{"hidden_size": 8}')
    assert input_digest(base) != before


# --- the marker


def test_a_checkpoint_of_the_same_key_is_resumed(tmp_path):
    ckpt = tmp_path / "ckpt"
    assert prepare_checkpoint_dir(ckpt, "k1", rank=0) is None
    done = complete_checkpoint(ckpt, 4)
    (ckpt / "checkpoint-6").mkdir()  # cut short by the kill: no trainer_state.json
    assert prepare_checkpoint_dir(ckpt, "k1", rank=0) == str(done)
    assert json.loads((ckpt / CHECKPOINT_MARKER).read_text()) == {"key": "k1"}


def test_a_marker_with_another_key_clears_the_old_checkpoints(tmp_path):
    ckpt = tmp_path / "ckpt"
    prepare_checkpoint_dir(ckpt, "k1", rank=0)
    complete_checkpoint(ckpt, 2)
    complete_checkpoint(ckpt, 4)
    assert prepare_checkpoint_dir(ckpt, "k2", rank=0) is None
    assert sorted(p.name for p in ckpt.iterdir()) == [CHECKPOINT_MARKER]
    assert json.loads((ckpt / CHECKPOINT_MARKER).read_text()) == {"key": "k2"}


def test_checkpoints_without_a_marker_are_not_trusted(tmp_path):
    ckpt = tmp_path / "ckpt"
    complete_checkpoint(ckpt, 4)  # left by a run that recorded no key (or an older modelmake)
    assert prepare_checkpoint_dir(ckpt, "k1", rank=0) is None
    assert not (ckpt / "checkpoint-4").exists()


def test_other_ranks_never_delete_and_wait_for_rank_0(tmp_path):
    ckpt = tmp_path / "ckpt"
    prepare_checkpoint_dir(ckpt, "old", rank=0)
    complete_checkpoint(ckpt, 4)
    with pytest.raises(RuntimeError, match="rank 0 did not mark"):
        prepare_checkpoint_dir(ckpt, "new", rank=1, wait_s=0.3)
    assert (ckpt / "checkpoint-4" / "trainer_state.json").exists()  # rank 1 deleted nothing
    assert json.loads((ckpt / CHECKPOINT_MARKER).read_text()) == {"key": "old"}  # nor wrote

    got = {}

    def rank1():
        got["resume"] = prepare_checkpoint_dir(ckpt, "new", rank=1, wait_s=30)

    waiting = threading.Thread(target=rank1)
    waiting.start()
    assert prepare_checkpoint_dir(ckpt, "new", rank=0) is None
    waiting.join(timeout=30)
    assert got == {"resume": None}  # rank 1 saw rank 0's decision: nothing to resume


def test_the_rank_comes_from_the_environment_by_default(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    prepare_checkpoint_dir(ckpt, "old", rank=0)
    complete_checkpoint(ckpt, 4)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RuntimeError):
        prepare_checkpoint_dir(ckpt, "new", wait_s=0.3)
    assert (ckpt / "checkpoint-4").exists()


# --- finishing a model folder


def test_a_finished_model_folder_lists_every_file_in_its_manifest_written_last(tmp_path):
    out = tmp_path / "model"
    tmp = new_model_folder(out)
    assert tmp.name == "model.tmp" and tmp.is_dir()
    (tmp / "model.safetensors").write_bytes(b"w")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "x.txt").write_text("x")
    finish_model_folder(tmp, out, config={"a": 1}, counts={"n": 1}, extra={"metrics.json": {"loss": 0.5}})
    assert not tmp.exists()
    manifest = json.loads((out / MANIFEST).read_text())
    assert sorted(manifest) == ["metrics.json", "model.safetensors", "provenance.json", "sub/x.txt"]
    assert manifest["model.safetensors"]["bytes"] == 1
    assert json.loads((out / "provenance.json").read_text())["counts"] == {"n": 1}


def test_finishing_replaces_the_previous_folder_and_other_ranks_clear_nothing(tmp_path):
    out = tmp_path / "model"
    model_folder(out)
    (out / "stale.txt").write_text("from an earlier run")
    tmp = new_model_folder(out)
    (tmp / "left.txt").write_text("rank 0 is writing")
    assert new_model_folder(out, rank=1) == tmp and (tmp / "left.txt").exists()
    finish_model_folder(tmp, out, config={})
    assert not (out / "stale.txt").exists() and (out / "left.txt").exists()
