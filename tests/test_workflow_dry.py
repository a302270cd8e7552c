"""Build-system behaviour that needs no model: dry runs, the DAG, lint, config errors (seconds)."""

from __future__ import annotations

import re
import shutil
import subprocess

from conftest import REPO, run_snakemake, small_config, write_config


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
    import yaml

    from modelmake.config import validate

    validate(yaml.safe_load((REPO / "config.yaml").read_text()))
    cluster = yaml.safe_load((REPO / "config/cluster.example.yaml").read_text())
    validate(cluster, check_paths=False)  # its model paths exist on the cluster, not here
