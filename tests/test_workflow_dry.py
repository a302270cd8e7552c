"""Build-system behaviour that needs no model: dry runs, the DAG, lint, config errors (seconds)."""

from __future__ import annotations

import re
import shutil
import subprocess

import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO, SNAKEMAKE, _absolute, env, run_snakemake, small_config, write_config

# The rules each pipeline section adds (besides the shared reformat and demo-asset rules).
PIPELINE_RULES = {
    "pseudo_labels": {"shard", "generate_shard", "merge_pseudo_labels"},
    "router": {"router_data", "router_train", "router_score", "router_calibrate", "router_evaluate"},
    "selfplay": {"selfplay_prompts", "selfplay_fractions", "selfplay_convert", "selfplay_train",
                 "selfplay_eval", "selfplay_plot"},
    "arena": {"arena_prepare", "arena_sample_prompts", "arena_generate", "arena_pairs", "arena_train",
              "arena_predict", "arena_merge_pseudo", "arena_export", "arena_export_ensemble", "arena_report"},
    "distill": {"distill_chat_data", "distill_web_data", "distill_init_student", "distill_stage", "distill_eval"},
}
SHARED_RULES = {"reformat", "build_tokenizer", "build_model", "all"}


def run_user_config(workdir: Path, config: dict, *args: str):
    """Dry-run a user's config file (--configfile user.yaml) in a working folder that also holds the
    demo's config.yaml, as a checkout does: nothing of the demo may leak into the plan."""
    write_config(workdir, small_config(workdir))
    write_config(workdir, config, name="user.yaml")
    return run_snakemake(workdir, "-n", *args, configfile="user.yaml")


def jobs_planned(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run as {rule: count}."""
    table = output.split("Job stats:")[1].split("total")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)}


def test_dry_run_of_the_demo_prints_every_step(tmp_path):
    c = small_config(tmp_path)
    write_config(tmp_path, c)
    planned = jobs_planned(run_snakemake(tmp_path, "-n").stdout)
    expected = {
        # pseudo-labels (and the shared demo assets; selfplay adds its dataset's two reformat jobs)
        "reformat": 4, "build_tokenizer": 1, "shard": 2, "generate_shard": 4, "merge_pseudo_labels": 2,
        "build_model": len(c["assets"]["models"]), "all": 1,
        # selfplay: generation jobs appear once the fractions checkpoint has run
        "selfplay_prompts": 2, "selfplay_fractions": 2, "selfplay_convert": 4, "selfplay_train": 2,
        "selfplay_eval": 2, "selfplay_plot": 1,
        "distill_chat_data": 1, "distill_web_data": 1, "distill_init_student": 1, "distill_stage": 2,
        "distill_eval": 1,
    }
    assert {r: planned.get(r) for r in expected} == expected
    for prefix in ("router_", "arena_"):
        assert any(r.startswith(prefix) for r in planned), f"no {prefix}* job planned: {planned}"


def test_dag_renders_with_every_rule_connected(tmp_path):
    write_config(tmp_path, small_config(tmp_path))
    dot = run_snakemake(tmp_path, "--dag").stdout
    dot = dot[dot.index("digraph"):]
    for rule in ["reformat", "shard", "build_tokenizer", "build_model", "generate_shard",
                 "merge_pseudo_labels"]:
        assert rule in dot
    assert dot.count("->") >= 12
    if shutil.which("dot"):
        png = subprocess.run(["dot", "-Tpng"], input=dot.encode(), capture_output=True, check=True).stdout
        assert png.startswith(b"\x89PNG")


def test_lint_is_clean(tmp_path):
    write_config(tmp_path, small_config(tmp_path))
    out = run_snakemake(tmp_path, "--lint").stdout
    assert "Congratulations, your workflow is in a good condition!" in out


def test_one_shard_target_builds_that_shard_and_its_inputs_only(tmp_path):
    write_config(tmp_path, small_config(tmp_path))
    target = str(tmp_path / "results/pseudo_labels/chat_en/teacher/part0/shard1.jsonl")
    planned = jobs_planned(run_snakemake(tmp_path, "-n", target).stdout)
    assert planned["generate_shard"] == 1
    assert planned["shard"] == 1  # chat_en's partition only
    assert "merge_pseudo_labels" not in planned


def test_partition_subset_builds_only_those_partitions(tmp_path):
    cfg = small_config(tmp_path, **{"pseudo_labels.partitions": 4, "pseudo_labels.build_partitions": [1, 3]})
    write_config(tmp_path, cfg)
    out = run_snakemake(tmp_path, "-n").stdout
    planned = jobs_planned(out)
    assert planned["shard"] == 4 and planned["generate_shard"] == 8
    assert "part0" not in out and "part2" not in out


def test_bad_config_is_reported_with_key_path_before_any_job(tmp_path):
    cfg = small_config(tmp_path)
    cfg["serve"]["max_model_len"] = "big"
    cfg["serve"]["servers"] = 2  # unknown key
    write_config(tmp_path, cfg)
    proc = run_snakemake(tmp_path, "-n", check=False)
    assert proc.returncode != 0
    assert "serve.max_model_len: 'big' is not of type 'integer'" in proc.stdout
    assert "'servers' was unexpected" in proc.stdout and "servers_per_partition" in proc.stdout
    assert not (tmp_path / "results").exists()


def test_missing_input_file_is_reported_with_key_path(tmp_path):
    cfg = small_config(tmp_path)
    cfg["datasets"]["chat_zh"]["splits"]["train"] = [str(tmp_path / "nope.jsonl")]
    write_config(tmp_path, cfg)
    proc = run_snakemake(tmp_path, "-n", check=False)
    assert proc.returncode != 0
    assert "datasets.chat_zh.splits.train[0]: file" in proc.stdout and "does not exist" in proc.stdout


def test_shipped_configs_validate():
    from modelmake.config import validate

    validate(yaml.safe_load((REPO / "config.yaml").read_text()))
    cluster = yaml.safe_load((REPO / "config/cluster.example.yaml").read_text())
    validate(cluster, check_paths=False)  # its model paths exist on the cluster, not here


@pytest.mark.parametrize("pipeline", sorted(PIPELINE_RULES))
def test_a_config_with_one_pipeline_section_plans_only_that_pipeline(tmp_path, pipeline):
    c = small_config(tmp_path)
    for other in PIPELINE_RULES:
        if other != pipeline:
            c.pop(other)
    planned = set(jobs_planned(run_user_config(tmp_path, c).stdout))
    assert planned - SHARED_RULES <= PIPELINE_RULES[pipeline]
    # selfplay's generation jobs appear only once its fractions checkpoint has run
    assert PIPELINE_RULES[pipeline] - planned <= {"selfplay_generate"}


def test_a_configfile_is_the_whole_config_nothing_of_the_demo_leaks_in(tmp_path):
    """Only what the user's file says: no demo section, key or default from config.yaml."""
    model = tmp_path / "teacher"
    model.mkdir()
    c = small_config(tmp_path)
    user = {"results": c["results"], "seed": 1, "models": {"teacher": {"path": str(model)}},
            "datasets": {"chat_en": c["datasets"]["chat_en"]},
            "serve": {"servers_per_partition": 1, "max_model_len": 512, "ready_timeout_s": 60},
            "pseudo_labels": {**c["pseudo_labels"], "datasets": ["chat_en"]}}
    out = run_user_config(tmp_path, user, "-p").stdout
    planned = jobs_planned(out)
    assert set(planned) == {"reformat", "shard", "generate_shard", "merge_pseudo_labels", "all"}
    assert planned["generate_shard"] == 2 and "chat_zh" not in out and "assets/" not in out
    assert '"servers":1' in out and "tiny-llama" not in out


def test_configfiles_layer_in_order_a_machine_override_on_a_base(tmp_path):
    """--configfile base.yaml machine.yaml: mappings merge key by key, later files win, lists are replaced."""
    write_config(tmp_path, small_config(tmp_path))
    (tmp_path / "machine.yaml").write_text(yaml.safe_dump(
        {"pseudo_labels": {"partitions": 3, "datasets": ["chat_zh"]}, "serve": {"servers_per_partition": 1}}))
    out = run_snakemake(tmp_path, "-n", "-p", "--configfile", str(tmp_path / "config.yaml"),
                        str(tmp_path / "machine.yaml")).stdout
    planned = jobs_planned(out)
    assert planned["generate_shard"] == 3 * 2  # chat_zh only, 3 partitions x 2 shards
    assert planned["merge_pseudo_labels"] == 1 and "pseudo_labels/chat_en" not in out
    assert '"servers":1' in out
    assert planned["router_train"] == 1  # the base's other sections stay


def test_without_a_configfile_the_embedded_demo_is_the_config():
    proc = subprocess.run([SNAKEMAKE, "-n", "--quiet", "rules", "--cores", "1"], cwd=REPO, env=env(),
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.returncode == 0, proc.stdout[-3000:]
    planned = jobs_planned(proc.stdout)
    for rules in PIPELINE_RULES.values():
        assert planned.keys() & rules


def _stub_model(folder: Path) -> None:
    """A model folder as a dry run sees it: config.json and tokenizer files, no weights."""
    from tokenizers import Tokenizer, models

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    Tokenizer(models.WordLevel({"<unk>": 0, "hi": 1}, unk_token="<unk>")).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))


def _stubbed(config_file: Path, tmp: Path) -> dict:
    """A shipped cluster config with its absolute paths replaced by stubs under tmp (model folders
    under models.*.path, data files elsewhere), repository paths made absolute, results under tmp."""
    c = _absolute(yaml.safe_load(config_file.read_text()))

    def stub(node, at=()):
        if isinstance(node, dict):
            return {k: stub(v, at + (k,)) for k, v in node.items()}
        if isinstance(node, list):
            return [stub(v, at) for v in node]
        if isinstance(node, str) and node.startswith("/") and not Path(node).exists():
            target = tmp / "stub" / node.lstrip("/")
            if at[0] == "models":
                _stub_model(target)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(json.dumps({"id": "x", "text": "hi", "data": ["hi", "hello"]}) + "\n")
            return str(target)
        return node

    c = stub(c)
    c["results"] = str(tmp / "results")
    return c


CLUSTER_CONFIGS = sorted(p.relative_to(REPO) for p in (REPO / "config").rglob("*.yaml"))


@pytest.mark.parametrize("profile", [None, "profiles/slurm"])
@pytest.mark.parametrize("config_file", CLUSTER_CONFIGS, ids=str)
def test_every_shipped_config_dry_runs_alone_and_through_the_slurm_profile(tmp_path, config_file, profile):
    args = ["--profile", str(REPO / profile)] if profile else []
    planned = jobs_planned(run_user_config(tmp_path, _stubbed(REPO / config_file, tmp_path), *args).stdout)
    sections = yaml.safe_load((REPO / config_file).read_text()).keys() & PIPELINE_RULES.keys()
    assert sections, f"{config_file} builds no pipeline"
    for section in sections:
        assert planned.keys() & PIPELINE_RULES[section], f"{config_file}: nothing of {section} planned"
