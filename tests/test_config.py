"""modelmake.config: config.yaml checked against the schema plus cross-checks, with errors that
name the key path and what is expected, and schema defaults filled in."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from modelmake.config import validate
from modelmake.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((REPO / "config.yaml").read_text())


@pytest.fixture
def config(monkeypatch):
    """A fresh copy of the demo config, with the working directory at the repository root."""
    monkeypatch.chdir(REPO)
    return copy.deepcopy(DEMO)


def problems(config: dict) -> str:
    with pytest.raises(ConfigError) as info:
        validate(config)
    return str(info.value)


def test_demo_config_is_valid(config):
    out = validate(config)
    assert out["serve"]["max_model_len"] == 512
    assert out["models"]["teacher"] == {"asset": "tiny-llama"}  # pipelines add their own roles


def test_dataset_paths_are_checked_relative_to_the_working_directory(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = problems(config)
    assert "datasets.chat_en.splits.train[0]" in msg
    assert "datasets.chat_zh.splits.train[0]" in msg
    assert str(tmp_path) in msg


def test_unknown_key_names_its_section_and_the_allowed_keys(config):
    config["serve"]["max_model_length"] = 1024
    msg = problems(config)
    assert "serve: " in msg
    assert "'max_model_length' was unexpected" in msg
    assert "allowed keys:" in msg
    allowed = msg.split("allowed keys:")[1].splitlines()[0]
    assert "max_model_len" in allowed and "servers_per_partition" in allowed


def test_unknown_top_level_key_is_reported(config):
    config["pseudo_label"] = {}
    msg = problems(config)
    assert "(top level)" in msg and "'pseudo_label' was unexpected" in msg
    assert "pseudo_labels" in msg.split("allowed keys:")[1]


def test_wrong_type_names_the_key_path_and_the_expected_type(config):
    config["serve"]["max_model_len"] = "big"
    msg = problems(config)
    assert "serve.max_model_len: 'big' is not of type 'integer'" in msg


def test_wrong_type_in_a_list_names_the_index(config):
    config["pseudo_labels"]["datasets"] = ["chat_en", 3]
    msg = problems(config)
    assert "pseudo_labels.datasets[1]: 3 is not of type 'string'" in msg


def test_every_problem_is_listed_not_just_the_first(config):
    config["serve"]["max_model_len"] = "big"
    config["reformat"]["on_error"] = "ignore"
    del config["seed"]
    msg = problems(config)
    assert "serve.max_model_len" in msg
    assert "reformat.on_error: 'ignore' is not one of ['fail', 'skip']" in msg
    assert "'seed' is a required property" in msg


def test_missing_dataset_file_names_the_key_path(config):
    config["datasets"]["chat_en"]["splits"]["train"] = ["resources/demo/nope.jsonl"]
    msg = problems(config)
    assert "datasets.chat_en.splits.train[0]: file 'resources/demo/nope.jsonl' does not exist" in msg
    assert "chat_zh" not in msg


def test_missing_model_folder_names_the_key_path(config):
    config["models"]["teacher"] = {"path": "models/absent"}
    msg = problems(config)
    assert "models.teacher.path: dir 'models/absent' does not exist" in msg


def test_paths_must_be_of_the_right_kind(config):
    config["datasets"]["chat_en"]["splits"]["train"] = ["resources/demo"]  # a folder, not a file
    config["models"]["teacher"] = {"path": "config.yaml"}  # a file, not a model folder
    msg = problems(config)
    assert "datasets.chat_en.splits.train[0]: file 'resources/demo' does not exist" in msg
    assert "models.teacher.path: dir 'config.yaml' does not exist" in msg


def test_check_paths_false_skips_the_existence_checks(config):
    config["datasets"]["chat_en"]["splits"]["train"] = ["resources/demo/nope.jsonl"]
    assert validate(config, check_paths=False)["datasets"]["chat_en"]["splits"]["train"] == [
        "resources/demo/nope.jsonl"]


def test_model_with_both_asset_and_path_is_refused(config):
    config["models"]["teacher"] = {"asset": "tiny-llama", "path": "resources/demo"}
    msg = problems(config)
    assert "models.teacher: give exactly one of asset, path" in msg


def test_model_with_neither_asset_nor_path_is_refused(config):
    config["models"]["teacher"] = {}
    msg = problems(config)
    assert "models.teacher: give exactly one of asset, path" in msg


def test_model_asset_must_name_an_asset_model(config):
    config["models"]["teacher"] = {"asset": "huge-llama"}
    msg = problems(config)
    assert "models.teacher.asset: 'huge-llama' is not a key of assets.models" in msg


def test_teacher_must_name_a_model(config):
    config["pseudo_labels"]["teacher"] = "student"
    msg = problems(config)
    assert "pseudo_labels.teacher: 'student' is not a key of models" in msg


def test_pseudo_label_datasets_and_split_must_exist(config):
    config["pseudo_labels"]["datasets"] = ["chat_en", "chat_fr"]
    assert "pseudo_labels.datasets[1]: 'chat_fr' is not a key of datasets" in problems(config)
    config["pseudo_labels"]["datasets"] = ["chat_en"]
    config["pseudo_labels"]["split"] = "test"
    assert "pseudo_labels.split: 'test' is not a split of datasets.chat_en" in problems(config)


def test_build_partitions_must_be_below_partitions(config):
    config["pseudo_labels"]["partitions"] = 2
    config["pseudo_labels"]["build_partitions"] = [0, 2]
    msg = problems(config)
    assert "pseudo_labels.build_partitions[1]: 2 is not below partitions=2" in msg
    assert "build_partitions[0]" not in msg


def test_conversation_budget_above_max_model_len_is_refused(config):
    config["pseudo_labels"]["max_conversation_tokens"] = 513
    msg = problems(config)
    assert "pseudo_labels.max_conversation_tokens: 513 exceeds serve.max_model_len=512" in msg


def test_conversation_budget_equal_to_max_model_len_is_allowed(config):
    config["pseudo_labels"]["max_conversation_tokens"] = 512
    assert validate(config)["pseudo_labels"]["max_conversation_tokens"] == 512


def test_tokenizer_corpora_must_be_datasets(config):
    config["assets"]["tokenizer"]["corpora"] = ["chat_en", "wiki"]
    assert "assets.tokenizer.corpora[1]: 'wiki' is not a key of datasets" in problems(config)


def test_error_message_names_the_schema_and_how_to_proceed(config):
    config["serve"]["max_model_len"] = 0
    msg = problems(config)
    assert "config.schema.yaml" in msg
    assert "serve.max_model_len: 0 is less than the minimum of 1" in msg


def test_missing_optional_keys_get_their_schema_defaults(config):
    del config["serve"]["gpu"]
    del config["serve"]["dtype"]
    del config["pseudo_labels"]["concurrency"]
    del config["pseudo_labels"]["max_failure_share"]
    out = validate(config)
    assert out["serve"]["gpu"] is False
    assert out["serve"]["dtype"] == "auto"
    assert out["pseudo_labels"]["concurrency"] == 8
    assert out["pseudo_labels"]["max_failure_share"] == 0.05


def test_given_values_are_not_overwritten_by_defaults(config):
    config["serve"]["gpu"] = True
    config["pseudo_labels"]["concurrency"] = 3
    out = validate(config)
    assert out["serve"]["gpu"] is True
    assert out["pseudo_labels"]["concurrency"] == 3
    assert out["serve"]["dtype"] == "float32"


def test_model_that_is_not_a_mapping_gets_one_clear_type_error(config):
    config["models"]["teacher"] = "tiny-llama"
    msg = problems(config)
    assert "models.teacher: 'tiny-llama' is not of type 'object'" in msg
    assert "valid under each of" not in msg  # no confusing second report from oneOf


@pytest.mark.parametrize("value,expected", [
    ({"a": 1}, "is not of type 'array'"),
    ([], "should be non-empty"),
    ([-1], "-1 is less than the minimum of 0"),
])
def test_bad_build_partitions_says_what_each_allowed_form_expects(config, value, expected):
    config["pseudo_labels"]["build_partitions"] = value
    msg = problems(config)
    assert "pseudo_labels.build_partitions: " in msg
    assert "is not of type 'null'" in msg
    assert expected in msg
    assert "give exactly one of" not in msg
