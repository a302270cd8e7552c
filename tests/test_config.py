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
    config["datasets"]["chat_en"]["splits"]["train"] = ["resources/demo"]  # a folder, not a datasets folder
    config["datasets"]["chat_zh"]["splits"]["train"] = ["README.md"]  # no format modelmake reads
    config["models"]["teacher"] = {"path": "config.yaml"}  # a file, not a model folder
    msg = problems(config)
    assert ("datasets.chat_en.splits.train[0]: 'resources/demo' is a folder but not one saved by datasets' "
            "save_to_disk") in msg
    assert "datasets.chat_zh.splits.train[0]: 'README.md': unknown format (by its suffix); modelmake reads .csv" in msg
    assert "models.teacher.path: dir 'config.yaml' does not exist" in msg


def test_record_sources_may_be_datasets_folders_and_hub_ids_which_are_not_checked(config, tmp_path):
    import datasets

    datasets.Dataset.from_list([{"data": ["q", "a"]}]).save_to_disk(str(tmp_path / "saved"))
    config["datasets"]["chat_en"]["splits"]["train"] = [str(tmp_path / "saved"), "hf://owner/chat:en@train"]
    config["datasets"]["chat_en"]["fields"] = {"messages": "conversation"}
    out = validate(config)
    assert out["datasets"]["chat_zh"]["fields"] == {}  # the default: today's names
    assert out["datasets"]["chat_en"]["fields"] == {"messages": "conversation"}


def test_field_maps_default_to_the_canonical_names(config):
    out = validate(config)
    assert out["router"]["fields"] == {} and out["arena"]["fields"] == {}
    assert out["arena"]["response_pairs"]["fields"] == {}
    assert out["distill"]["web"]["text_field"] == "text"
    config["router"]["fields"] = {"prompt": "question", "score": "x"}
    assert "router.fields: Additional properties are not allowed ('score' was unexpected)" in problems(config)


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


def test_conversation_budget_is_checked_against_each_served_roles_own_max_model_len(config):
    """A role's models.<role>.serve.max_model_len replaces serve.max_model_len for that role only."""
    config["models"]["teacher"]["serve"] = {"max_model_len": 256}
    config["models"]["arena_b"]["serve"] = {"max_model_len": 1024}
    config["serve"]["max_model_len"] = 200
    config["selfplay"]["max_conversation_tokens"] = 200
    msg = problems(config)
    assert "pseudo_labels.max_conversation_tokens: 384 exceeds models.teacher.serve.max_model_len=256" in msg
    # arena_a has no max_model_len of its own: the serve section's is its limit; arena_b's 1024 is enough
    assert "arena.response_pairs.max_conversation_tokens: 256 exceeds serve.max_model_len=200 (the " \
           "max_model_len of arena_a)" in msg
    assert "arena_b" not in msg and "selfplay." not in msg


def test_a_roles_serve_settings_override_the_serve_section_key_by_key(config):
    from modelmake.config import role_serve

    config["models"]["teacher"]["serve"] = {"tensor_parallel_size": 2, "vllm_args": ["--max-num-seqs", "8"]}
    c = validate(config)
    got = role_serve(c, "teacher")
    assert got["tensor_parallel_size"] == 2 and got["vllm_args"] == ["--max-num-seqs", "8"]  # lists replaced
    assert got["max_model_len"] == 512 and got["dtype"] == "float32"  # the rest from serve
    assert role_serve(c, "sft")["tensor_parallel_size"] == 1 and c["serve"]["gpu_memory_utilization"] is None
    assert c["models"]["sft"] == {"asset": "tiny-llama"}  # no defaults filled into a role


def test_a_roles_serve_settings_are_checked(config):
    config["models"]["teacher"]["serve"] = {"tensor_parallel_size": 0, "servers_per_partition": 2,
                                            "gpu_memory_utilization": 1.5}
    msg = problems(config)
    assert "models.teacher.serve.tensor_parallel_size: 0 is less than the minimum of 1" in msg
    assert "models.teacher.serve.gpu_memory_utilization: 1.5 is greater than the maximum of 1" in msg
    assert "'servers_per_partition' was unexpected" in msg  # a pool's size is not a model's


def test_resources_have_demo_sized_defaults_per_kind(config):
    r = validate(config)["resources"]
    assert r["router"]["train"] == {"mem_mb": 8000, "runtime": 600, "cpus": 2}  # GPUs: router.train.gpu
    assert r["data"] == {"mem_mb": 2000, "runtime": 60, "cpus": 1, "gpus": 0}
    assert r["pseudo_labels"]["generate"] == {"mem_mb": 2000, "cpus": 1}
    assert r["partitions"] == {"cpu": "cpu", "gpu": "gpu"}


def test_a_resource_figure_a_pipeline_fixes_is_refused_with_the_key_to_set(config):
    config["resources"] = {"router": {"train": {"gpus": 2, "mem_mb": 64000}},
                           "pseudo_labels": {"generate": {"runtime": 30}},
                           "distill": {"stage": {"gpus": 8}}}
    msg = problems(config)
    assert "resources.router.train.gpus: set by router.scale (processes x nodes when gpu); remove it here" in msg
    assert "resources.pseudo_labels.generate.runtime: set by serve.runtime_per_shard_min; remove it here" in msg
    assert "resources.distill.stage.gpus: set by distill.service" in msg
    assert "mem_mb" not in msg


def test_resource_kinds_and_figures_are_checked(config):
    config["resources"] = {"router": {"train": {"mem": 4}}, "generate": {}, "data": {"runtime": 0}}
    msg = problems(config)
    assert "resources.router.train: Unevaluated properties are not allowed ('mem' was unexpected)" in msg
    assert "resources: Additional properties are not allowed ('generate' was unexpected)" in msg
    assert "resources.data.runtime: 0 is less than the minimum of 1" in msg


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


@pytest.mark.parametrize("value", [0, "partitions", 2.5])
def test_shards_per_job_is_a_positive_count_or_partition_and_defaults_to_one(config, value):
    from modelmake.config import validate

    assert validate(copy.deepcopy(config))["pseudo_labels"]["shards_per_job"] == 1
    config["pseudo_labels"]["shards_per_job"] = value
    msg = problems(config)
    assert f"pseudo_labels.shards_per_job: {value!r} matches none of the allowed forms" in msg
    assert "'partition' was expected" in msg


def test_a_job_names_at_most_a_thousand_shards_on_its_command_line(config):
    from modelmake.config import validate

    config["pseudo_labels"].update(shards_per_partition=5000, shards_per_job=1000)
    validate(copy.deepcopy(config))
    config["pseudo_labels"]["shards_per_job"] = "partition"
    assert ("pseudo_labels.shards_per_job: 5000 shards in one job; at most 1000 (the job's command line names "
            "each shard file") in problems(copy.deepcopy(config))
    config["pseudo_labels"].update(shards_per_partition=1000)
    validate(copy.deepcopy(config))


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


# --- defaults in one place: the schema's, asked for by the library


def set_default(root: dict, path: str, value) -> None:
    """Set a default in a raw schema: ``path`` as in config.schema_at, without crossing a $ref."""
    keys = path.split(".")
    node = root["$defs"][keys[1]] if keys[0] == "$defs" else root["properties"][keys[0]]
    for k in keys[2:] if keys[0] == "$defs" else keys[1:]:
        node = node["properties"][k]
    node["default"] = value


@pytest.fixture
def patched_schema(monkeypatch):
    """Change schema defaults for one test: patched_schema({"router.train.lr": 0.5})."""
    from modelmake import config as cfg

    def patch(changes: dict):
        root = copy.deepcopy(cfg.schema())
        for path, value in changes.items():
            set_default(root, path, value)
        monkeypatch.setattr(cfg, "schema", lambda: root)

    return patch


def test_schema_lookups_name_a_config_key_a_definition_or_a_pointer():
    from modelmake.config import default, defaults, schema_at

    assert default("router.train.lr") == 2e-5
    assert default("$defs.generation.concurrency") == 8
    assert default("selfplay.concurrency") == 16  # a section's own default beside the shared $defs/generation
    assert default("arena.response_pairs.max_failure_share") == 0.25
    assert schema_at("#/$defs/generation") == schema_at("$defs.generation")
    assert defaults("arena.template") == {"max_length": 256, "head_share": 0.5}
    with pytest.raises(KeyError, match="router.train.nope"):
        default("router.train.nope")
    with pytest.raises(KeyError, match="no default"):
        default("router.base")


def test_fill_defaults_keeps_given_values_and_can_refuse_unknown_keys():
    from modelmake.config import fill_defaults

    given = {"lr": 0.5}
    out = fill_defaults("router.train", given)
    assert out["lr"] == 0.5 and out["batch_size"] == 8 and given == {"lr": 0.5}
    with pytest.raises(ConfigError, match=r"selfplay.train: unknown keys \['lr'\]; allowed: .*'learning_rate'"):
        fill_defaults("$defs.selfplay_train", {"lr": 0.5}, check="selfplay.train")


def test_an_iteration_override_changes_only_the_keys_it_names(config):
    config["selfplay"]["sampling"]["ignore_eos"] = True
    config["selfplay"]["per_iteration"] = [{}, {"train": {"prior": 0.5}, "sampling": {"temperature": 0.5}}]
    out = validate(config)
    sp = out["selfplay"]
    assert sp["per_iteration"][1] == {"train": {"prior": 0.5}, "sampling": {"temperature": 0.5}}  # no defaults
    assert sp["train"]["save_steps"] == 20  # the section itself is filled
    merged = {**sp["sampling"], **sp["per_iteration"][1]["sampling"]}  # as rules/functions/selfplay.smk does
    assert merged["ignore_eos"] is True and merged["temperature"] == 0.5


def typed_settings() -> dict:
    """What each typed settings object and settings function of the library gives when given nothing,
    by the schema object whose defaults it must have."""
    from dataclasses import asdict

    from modelmake.arena.model import TrainSettings
    from modelmake.arena.template import TemplateSettings
    from modelmake.generate import GenerateSettings, Sampling
    from modelmake.router.train import train_settings as router_train
    from modelmake.selfplay.train import train_settings as selfplay_train
    from modelmake.serve import PoolSpec

    generate = asdict(GenerateSettings(model="m", sampling=Sampling(), config_key=None))
    return {
        "$defs.sampling": asdict(Sampling()),
        "$defs.generation": {k: generate[k] for k in ("max_conversation_tokens", "concurrency", "retries",
                                                      "max_failure_share")},
        "pseudo_labels": {k: generate[k] for k in ("regenerate", "ending_user_turn")},
        "serve": {k: v for k, v in asdict(PoolSpec(model="m", served_name="t")).items()
                  if k not in ("model", "served_name", "servers", "host", "seed", "server_command")},
        "$defs.arena_stage": asdict(TrainSettings()),
        "arena.template": asdict(TemplateSettings()),  # a standalone copy (shipped with the submission)
        "router.train": router_train({}),
        "$defs.selfplay_train": selfplay_train({}),
    }


def test_typed_settings_have_the_schemas_defaults():
    from modelmake.config import defaults

    for where, got in typed_settings().items():
        want = defaults(where)
        assert got == {k: want[k] for k in got}, where
    assert typed_settings()["router.train"] == defaults("router.train")  # the old scale keys have none


def test_a_schema_default_change_reaches_the_code(patched_schema):
    from modelmake.cli import parser

    patched_schema({"router.train.lr": 0.123, "$defs.selfplay_train.beta": 0.77, "$defs.generation.retries": 9,
                    "$defs.sampling.top_p": 0.5, "serve.dtype": "bfloat16", "$defs.arena_stage.lr": 0.5,
                    "router.evaluate.points": 7, "serve.idle_timeout_s": 3})
    got = typed_settings()
    assert got["router.train"]["lr"] == 0.123
    assert got["$defs.selfplay_train"]["beta"] == 0.77
    assert got["$defs.generation"]["retries"] == 9
    assert got["$defs.sampling"]["top_p"] == 0.5
    assert got["serve"]["dtype"] == "bfloat16"
    assert got["$defs.arena_stage"]["lr"] == 0.5
    assert parser().parse_args(["router-evaluate", "s", "--metrics", "m", "--plot", "p"]).points == 7
    assert parser().parse_args(["serve", "--folder", "f", "--log-dir", "l", "--spec", "{}"]).idle_timeout == 3


def test_command_line_defaults_are_the_schemas():
    from modelmake.cli import parser
    from modelmake.config import default

    def args(*argv):
        return parser().parse_args(list(argv))

    serve = args("serve", "--folder", "f", "--log-dir", "l", "--spec", "{}")
    assert (serve.ready_timeout, serve.idle_timeout) == (default("serve.ready_timeout_s"),
                                                         default("serve.idle_timeout_s"))
    assert args("reformat", "x", "--out", "o").on_error == default("reformat.on_error")
    assert args("router-score", "--model", "m", "--split", "s").batch_size == default("router.score.batch_size")
    assert args("router-evaluate", "s", "--metrics", "m", "--plot", "p").points == default("router.evaluate.points")
    assert args("arena-export", "--model", "m", "--labelled", "l", "--valid-fold", "0", "--stage-eval", "e",
                "--out", "o").tolerance == default("arena.export.tolerance")
    assert args("selfplay-eval", "t", "--model", "m", "--start", "s", "--out", "o", "--beta", "0.1",
                "--iteration", "0").max_length == default("$defs.selfplay_train.max_length")


def test_every_number_must_be_finite_a_timeout_of_inf_never_ends(config):
    config["serve"]["ready_timeout_s"] = float("inf")  # YAML's .inf: jsonschema takes it for a number
    config["serve"]["idle_timeout_s"] = float("nan")
    config["pseudo_labels"]["sampling"]["temperature"] = float("-inf")
    msg = problems(config)
    assert "serve.ready_timeout_s: inf is not a finite number" in msg
    assert "serve.idle_timeout_s: nan is not a finite number" in msg
    assert "pseudo_labels.sampling.temperature: -inf is not a finite number" in msg
    assert validate(yaml.safe_load(yaml.safe_dump(DEMO)))  # the demo's numbers are all finite


@pytest.mark.parametrize("name", ["t x;y", "../up", "-flag", ".hidden", "a/b", ""])
def test_a_model_role_name_must_be_a_safe_name(config, name):
    config["models"][name] = {"asset": "tiny-llama"}
    assert f"models: {name!r} is not a valid name: letters, digits, '.', '_' and '-', first a letter or digit" in (
        problems(config))


def test_a_model_path_must_hold_a_config(config, tmp_path):
    """config.json at config time; not tokenizer files (a dry run from a login node plans on folders
    that hold only their config, as the shipped cluster examples' stubbed dry runs do)."""
    model = tmp_path / "teacher"
    model.mkdir()
    config["models"]["teacher"] = {"path": str(model)}
    msg = problems(config)
    assert f"models.teacher.path: {str(model)!r} is not a model folder: no config.json" in msg
    (model / "config.json").write_text("{}")
    assert validate(config)["models"]["teacher"] == {"path": str(model)}  # no tokenizer needed to plan


def test_vllm_args_may_not_set_what_the_pool_sets_naming_the_key(config):
    config["serve"]["vllm_args"] = ["--max-num-seqs", "8", "--host", "0.0.0.0"]
    config["models"]["teacher"]["serve"] = {"vllm_args": ["--port=8000", "--dtype", "half"]}
    msg = problems(config)
    assert "serve.vllm_args: --host is set by the pool; servers listen on 127.0.0.1" in msg
    assert "models.teacher.serve.vllm_args: --port=8000 is set by the pool" in msg
    assert "models.teacher.serve.vllm_args: --dtype is set by the pool; set models.teacher.serve.dtype instead" in msg
    assert "--max-num-seqs" not in msg


# --- models a pipeline builds (models.<role>.built)

def test_a_role_may_name_a_model_a_pipeline_of_the_config_builds(config):
    config["models"]["policy"] = {"built": "selfplay/iter1"}
    config["models"]["last"] = {"built": "selfplay"}
    config["arena"]["response_pairs"]["generators"] = ["policy", "arena_b"]
    config["models"]["router_base"] = {"built": "selfplay/iter0"}
    config["models"]["trained_router"] = {"built": "router"}  # not used by any section: allowed
    config["models"]["student"] = {"built": "distill/stage1"}
    config["models"]["judge"] = {"built": "arena/stage3/arena_b"}
    out = validate(config)
    assert out["models"]["policy"] == {"built": "selfplay/iter1"}
    from modelmake.config import parse_built

    assert parse_built(out, "selfplay") == ("selfplay", {"iteration": 1})  # the last of 2 iterations
    assert parse_built(out, "distill") == ("distill", {"stage": 2})
    assert parse_built(out, "arena/stage3/arena_b") == ("arena", {"stage": 3, "base": "arena_b"})


@pytest.mark.parametrize("ref,expected", [
    ("selfplay/iter2", "models.policy.built: 'selfplay/iter2': there is no iter2: selfplay.iterations is 2 (iter0..iter1)"),
    ("selfplay/2", "models.policy.built: 'selfplay/2': '2' is not iter<n>"),
    ("distill/stage3", "models.policy.built: 'distill/stage3': there is no stage3: distillation has stage0"),
    ("arena/stage1/arena_c", "models.policy.built: 'arena/stage1/arena_c': 'arena_c' is not one of arena.bases"),
    ("arena/stage1", "models.policy.built: 'arena/stage1': give arena/stage<1|2|3>/<base>"),
    ("router/model", "models.policy.built: 'router/model': the router builds one model; give router"),
    ("assets/tiny-llama", "models.policy.built: 'assets/tiny-llama': no pipeline 'assets' builds models"),
])
def test_a_built_model_reference_is_checked_at_config_time(config, ref, expected):
    config["models"]["policy"] = {"built": ref}
    assert expected in problems(config)


def test_a_built_model_needs_its_pipelines_section(config):
    del config["router"]
    config["models"]["policy"] = {"built": "router"}
    msg = problems(config)
    assert "models.policy.built: 'router' names a model the router pipeline builds, but the config has no " \
           "router section" in msg


def test_a_role_gives_exactly_one_of_asset_path_built(config):
    config["models"]["teacher"] = {"asset": "tiny-llama", "built": "router"}
    assert "models.teacher: give exactly one of asset, path, built" in problems(config)


def test_the_distilled_student_is_refused_where_vllm_would_serve_it(config):
    config["models"]["student"] = {"built": "distill/stage2"}
    config["pseudo_labels"]["teacher"] = "student"
    msg = problems(config)
    assert ("models.student.built: 'distill/stage2' is the distilled RWKV-hybrid student, which vLLM cannot "
            "serve; pseudo_labels.teacher names student") in msg


@pytest.mark.parametrize("use,expected", [
    ("router.base", "is the distilled RWKV-hybrid student, whose model code only distillation loads"),
    ("arena.bases", "is the distilled RWKV-hybrid student, which has no sequence-classification head"),
    ("selfplay.sft_model", "which vLLM cannot serve; selfplay.sft_model names student"),
])
def test_the_distilled_student_is_refused_by_every_pipeline_that_would_load_it(config, use, expected):
    config["models"]["student"] = {"built": "distill"}
    section, key = use.split(".")
    if key == "bases":
        config["arena"]["bases"] = ["student", "arena_b"]
        config["arena"]["pseudo"]["weights"] = {"student": 0.5, "arena_b": 0.5}
    else:
        config[section][key] = "student"
    assert expected in problems(config)


def test_an_arena_classifier_is_not_served_or_trained_as_a_causal_lm(config):
    config["models"]["clf"] = {"built": "arena/stage3/arena_a"}
    config["selfplay"]["sft_model"] = "clf"
    config["router"]["base"] = "clf"
    msg = problems(config)
    assert "models.clf.built: 'arena/stage3/arena_a' is an arena pairwise classifier" in msg
    assert "which vLLM cannot serve; selfplay.sft_model names clf" in msg
    assert "not a causal LM; router.base names clf" in msg


def test_a_pipeline_cannot_start_from_its_own_model(config):
    config["models"]["sft"] = {"built": "selfplay/iter0"}
    msg = problems(config)
    assert ("models: the selfplay pipeline would need its own results (selfplay.sft_model is models.sft, built "
            "by selfplay)") in msg


def test_pipelines_cannot_need_each_others_models_in_a_cycle(config):
    config["models"]["sft"] = {"built": "router"}
    config["models"]["router_base"] = {"built": "selfplay/iter1"}
    msg = problems(config)
    assert "would need its own results" in msg
    assert "selfplay.sft_model is models.sft, built by router" in msg
    assert "router.base is models.router_base, built by selfplay" in msg
    assert msg.count("would need its own results") == 1  # one cycle, reported once


# ---------------------------------------------------------------- router.build_labels


def built_labels(config: dict) -> dict:
    """The demo config with layers/router_built_labels.yaml layered over it (as --configfile does)."""
    over = yaml.safe_load((REPO / "layers/router_built_labels.yaml").read_text())
    config["models"].update(over["models"])
    config["router"].update(over["router"])
    return config


def test_built_labels_name_the_routers_scores_and_need_no_data(config):
    out = validate(built_labels(config))
    assert out["router"]["data"] == []
    assert out["router"]["scores"] == {"weak": "router_weak", "strong": "router_strong",
                                       "scale": {"min": 1, "max": 10}, "labels": "linear"}
    g = out["router"]["build_labels"]["grading"]
    assert g["system"] == "You are a helpful assistant." and g["structured_api"] == "structured_outputs"
    assert 'strictly in this format: "Rating: [[k]]", where k is a whole number from {min} to {max}' in g["retry_prompt"]


def test_the_default_judge_prompt_is_mt_benchs_single_answer_grading(config):
    c = built_labels(config)
    for key in ("prompt", "structured"):
        del c["router"]["build_labels"]["grading"][key]
    c["router"]["build_labels"]["grading"]["max_conversation_tokens"] = 512
    g = validate(c)["router"]["build_labels"]["grading"]
    assert g["prompt"].startswith("[Instruction]\nPlease act as an impartial judge and evaluate the quality")
    assert 'by strictly following this format: "[[rating]]", for example: "Rating: [[5]]".' in g["prompt"]
    assert g["prompt"].endswith("[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n"
                                "[The End of Assistant's Answer]")
    assert g["structured"] == "explained" and g["max_failure_share"] == 0.05


def test_router_scores_that_contradict_the_built_labels_are_refused(config):
    c = built_labels(config)
    c["router"]["scores"] = {"weak": "mixtral-8x7b", "scale": {"min": 1, "max": 10}}
    msg = problems(c)
    assert "router.scores.weak: 'mixtral-8x7b', but the built labels' scores are named by " \
           "router.build_labels.weak ('router_weak')" in msg
    assert "router.scores.scale" not in msg  # equal: allowed


@pytest.mark.parametrize("change, expected", [
    (lambda r: r.update(data=[]) or r.pop("build_labels"),
     "router.data: no records to train on: list sources here, or add router.build_labels"),
    (lambda r: r["build_labels"].update(strong="router_weak"),
     "router.build_labels.strong: 'router_weak' is the weak model too"),
    (lambda r: r["build_labels"]["grading"].update(prompt="Rate {question} from {min} to {max}"),
     "router.build_labels.grading.prompt: the judge prompt must hold {answer}"),
    (lambda r: r["build_labels"]["grading"].update(scale={"min": 5, "max": 5}),
     "router.build_labels.grading.scale: min 5 must be below max 5"),
    (lambda r: r["build_labels"].update(judge="nobody"),
     "router.build_labels.judge: 'nobody' is not a key of models"),
    (lambda r: r["build_labels"]["prompts"].update(datasets=["chat_en"], split="test"),
     "router.build_labels.prompts.split: 'test' is not a split of datasets.chat_en"),
    (lambda r: r["build_labels"]["prompts"].update(files=["resources/demo/router/scored_prompts.jsonl"]),
     "router.build_labels.prompts: give exactly one of datasets, files"),
    (lambda r: r["build_labels"]["grading"].update(structured="off"),
     "router.build_labels.grading.structured: 'off' is not one of ['none', 'grade', 'explained']"),
    (lambda r: r["build_labels"]["grading"].update(max_conversation_tokens=2048),
     "router.build_labels.grading.max_conversation_tokens: 2048 exceeds serve.max_model_len=512 (the "
     "max_model_len of router_judge)"),
])
def test_built_label_settings_are_checked(config, change, expected):
    c = built_labels(config)
    change(c["router"])
    assert expected in problems(c)
