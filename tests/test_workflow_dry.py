"""Build-system behaviour that needs no model: dry runs, the DAG, lint, config errors (seconds)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

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


def test_shards_per_job_plans_a_job_per_group_of_a_partitions_shards_each_owning_their_files(tmp_path):
    """pseudo_labels.shards_per_job: N shards of a partition per generation job (the last group may be
    smaller), or a whole partition: the job's output is its group's folder, it is given every shard
    of its group, asks for their runtime, and the merge reads the folders."""
    labels = tmp_path / "results/pseudo_labels/chat_en/teacher"
    shards = tmp_path / "results/data/chat_en/shards/train"
    cfg = small_config(tmp_path, **{"pseudo_labels.partitions": 2, "pseudo_labels.shards_per_partition": 5,
                                    "pseudo_labels.shards_per_job": 2})
    write_config(tmp_path, cfg)
    out = run_snakemake(tmp_path, "-n", "-p", str(labels / "labels.parquet")).stdout
    assert jobs_planned(out)["generate_shard"] == 2 * 3  # partitions x groups of 2, 2 and 1 shards
    commands = re.findall(r"python -m modelmake generate (.*?) --out (\S+) ", out)
    groups = {(p, g): [str(shards / f"part{p}/shard{s}.jsonl") for s in range(2 * g, min(5, 2 * g + 2))]
              for p in range(2) for g in range(3)}
    assert sorted(commands) == sorted((" ".join(records), str(labels / f"part{p}/group{g}"))
                                      for (p, g), records in groups.items())
    outputs = re.findall(r"^\s+output: (.*)$", out.split("rule merge_pseudo_labels")[0], re.M)
    assert sorted(outputs)[-6:] == sorted(str(labels / f"part{p}/group{g}") for p, g in groups)
    merge = out.split("rule merge_pseudo_labels:")[1].split("\n\n")[0]
    assert re.search(r"input: (.*)", merge)[1].split(", ") == [str(labels / f"part{p}/group{g}") for p, g in groups]
    jobs = [j for j in planned_jobs(out) if j["rule"] == "generate_shard"]
    assert {j["resources"]["runtime"] for j in jobs} == {2 * cfg["serve"]["runtime_per_shard_min"]}

    cfg["pseudo_labels"]["shards_per_job"] = "partition"
    cfg["pseudo_labels"]["build_partitions"] = [1]  # this machine's partition: its folder is the target
    write_config(tmp_path, cfg)
    out = run_snakemake(tmp_path, "-n", "-p").stdout
    assert jobs_planned(out)["generate_shard"] == 2  # chat_en's and chat_zh's partition 1
    assert (" ".join(str(shards / f"part1/shard{s}.jsonl") for s in range(5)), str(labels / "part1/group0")) in (
        re.findall(r"python -m modelmake generate (.*?) --out (\S+) ", out))
    assert "merge_pseudo_labels" not in jobs_planned(out)


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


def test_record_sources_reach_their_jobs_folders_as_inputs_hub_ids_as_arguments(tmp_path):
    """A datasets folder is an input of reformat; a hub id is no file, so no input, but each job gets
    every source in order, with its field map."""
    import datasets

    datasets.Dataset.from_list([{"data": ["q", "a"]}]).save_to_disk(str(tmp_path / "saved"))
    c = small_config(tmp_path)
    demo_en = c["datasets"]["chat_en"]["splits"]["train"][0]
    c["datasets"]["chat_en"]["splits"]["train"] = ["hf://owner/chat:en@train", str(tmp_path / "saved"), demo_en]
    c["datasets"]["chat_en"]["fields"] = {"messages": "conversation"}
    c["arena"]["labelled"] = ["hf://owner/pairs@train"]
    c["arena"]["response_pairs"]["prompt_pool"] = "hf://owner/prompts@train"
    c["router"]["data"] = ["hf://owner/scored@train"]
    c["distill"]["web"]["files"]["en"] = ["hf://allenai/c4:en@validation"]
    c["distill"]["web"]["text_field"] = "raw_content"
    write_config(tmp_path, c)
    out = run_snakemake(tmp_path, "-n", "-p").stdout
    commands = [line for line in out.splitlines() if "python -m modelmake" in line]
    (reformat,) = [x for x in commands if " reformat " in x and "chat_en/reformatted/train" in x]
    assert f"reformat hf://owner/chat:en@train {tmp_path / 'saved'} {demo_en} --fields " in reformat
    assert """--fields '{"messages":"conversation"}'""" in reformat
    assert any("arena-prepare hf://owner/pairs@train --labelled" in x for x in commands)
    assert any("arena-sample-prompts hf://owner/prompts@train --fields '{}'" in x for x in commands)
    assert any("router-data hf://owner/scored@train --fields '{}'" in x for x in commands)
    assert any("distill-web-data" in x and '"text_field":"raw_content"' in x for x in commands)


def test_shipped_configs_validate():
    from modelmake.config import validate

    validate(yaml.safe_load((REPO / "config.yaml").read_text()))
    validate(layered([yaml.safe_load((REPO / f).read_text()) for f in ("config.yaml", BUILT_LABELS)]))
    for name, files in CLUSTER_EXAMPLES.items():
        # their model and data paths exist on the cluster, not here
        validate(layered([yaml.safe_load((CLUSTER / f).read_text()) for f in files]), check_paths=False)


BUILT_LABELS = "layers/router_built_labels.yaml"
# router.build_labels, in the order each step feeds the next
LABEL_CHAIN = ["reformat", "router_label_prompts", "router_label_answer", "router_judge_input", "router_judge",
               "router_judge_retry_input", "router_judge_retry", "router_labels", "router_data"]


def rule_edges(dot: str) -> set[tuple[str, str]]:
    """(from rule, to rule) of a --rulegraph."""
    names = dict(re.findall(r'^\s*(\d+)\[label = "(\w+)"', dot, re.M))
    return {(names[a], names[b]) for a, b in re.findall(r"^\s*(\d+) -> (\d+)", dot, re.M)}


def test_built_labels_chain_prompts_answers_grades_into_router_data(tmp_path):
    """layers/router_built_labels.yaml over the demo: the router's data come from the judge's grades of
    the weak and the strong model's answers to the chat datasets' first user turns."""
    write_config(tmp_path, small_config(tmp_path))
    shutil.copy(REPO / BUILT_LABELS, tmp_path / "built_labels.yaml")
    files = ("--configfile", str(tmp_path / "config.yaml"), str(tmp_path / "built_labels.yaml"))
    target = str(tmp_path / "results/router/built/data/train.parquet")
    out = run_snakemake(tmp_path, "-n", "-p", target, *files).stdout
    planned = jobs_planned(out)
    assert {r: planned.get(r) for r in LABEL_CHAIN} == {
        "reformat": 2, "router_label_prompts": 1, "router_label_answer": 2, "router_judge_input": 1,
        "router_judge": 1, "router_judge_retry_input": 1, "router_judge_retry": 1, "router_labels": 1,
        "router_data": 1}
    # one pool per served model: tiny-llama-b answers as the weak model; tiny-llama answers as the strong
    # one and grades as the judge (first replies and retries), from one pool; the records name the roles
    folders = re.findall(r'"folder":"([^"]+)"', out)
    assert len(folders) == 4 and len(set(folders)) == 2
    assert sorted(Path(f).parent.name.rsplit("-", 1)[0] for f in set(folders)) == ["tiny-llama", "tiny-llama-b"]
    for role in ("router_weak", "router_strong", "router_judge"):
        assert f'"label":"{role}"' in out
    assert '"structured_outputs":{"choice":["Rating: [[1]]",' in out
    assert "router-data " + str(tmp_path / "results/router/built/labels/scored_prompts.jsonl") in out
    assert '"strong":"router_strong","weak":"router_weak"' in out  # router.scores named by the roles
    dot = run_snakemake(tmp_path, "--rulegraph", "dot", target, *files).stdout
    edges = rule_edges(dot[dot.index("digraph"):])
    assert {(a, b) for a, b in zip(LABEL_CHAIN, LABEL_CHAIN[1:])} <= edges
    assert ("router_label_answer", "router_labels") in edges and ("build_model", "router_judge") in edges
    # the whole layered demo plans too: the router's rules share the workflow's namespace with the others'
    everything = jobs_planned(run_snakemake(tmp_path, "-n", *files).stdout)
    assert everything["generate_shard"] == 4 and everything["router_label_answer"] == 2


@pytest.mark.parametrize("pipeline", sorted(PIPELINE_RULES))
def test_a_config_with_one_pipeline_section_plans_only_that_pipeline(tmp_path, pipeline):
    c = small_config(tmp_path)
    for other in PIPELINE_RULES:
        if other != pipeline:
            c.pop(other)
    if pipeline == "distill":  # the demo trains on the pseudo-labels; alone it takes the chat datasets
        c["distill"]["chat"].update(pseudo_labels=False, datasets=["chat_en", "chat_zh"])
    planned = set(jobs_planned(run_user_config(tmp_path, c).stdout))
    assert planned - SHARED_RULES <= PIPELINE_RULES[pipeline]
    # selfplay's generation jobs appear only once its fractions checkpoint has run
    assert PIPELINE_RULES[pipeline] - planned <= {"selfplay_generate"}


def test_a_configfile_is_the_whole_config_nothing_of_the_demo_leaks_in(tmp_path):
    """Only what the user's file says: no demo section, key or default from config.yaml."""
    model = tmp_path / "teacher"
    model.mkdir()
    for name in ("config.json", "tokenizer.json"):  # what the config check looks for
        (model / name).write_text("{}")
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


def test_jobs_serving_one_model_the_same_way_share_one_pool_across_pipelines(tmp_path):
    """The demo serves tiny-llama as the pseudo-label teacher and as the arena generator arena_a, with
    the same settings: their jobs name one pool, and arena_b's tiny-llama-b another. A role's own serve
    key (models.<role>.serve) makes a pool of its own; the records keep the role's name either way."""
    def pools(config):
        write_config(tmp_path, config)
        out = run_snakemake(tmp_path, "-n", "-p", "--forceall").stdout
        found = {}
        for pool in re.findall(r"--pool '(\{.*?\})'", out):
            p = json.loads(pool)
            found.setdefault(p["label"], set()).add(p["folder"])
        return found

    shared = pools(small_config(tmp_path))
    assert {k: len(v) for k, v in shared.items()} == {"teacher": 1, "arena_a": 1, "arena_b": 1}
    assert shared["teacher"] == shared["arena_a"] != shared["arena_b"]
    assert Path(next(iter(shared["teacher"]))).parent.name.startswith("tiny-llama-")
    apart = pools(small_config(tmp_path, **{"models.arena_a.serve": {"max_model_len": 256}}))
    assert apart["teacher"] == shared["teacher"] and apart["arena_a"] != apart["teacher"]


# The cluster examples (config/cluster/): each file a whole config; several given together build
# several pipelines ("all": every pipeline file, merged in order).
CLUSTER = REPO / "config/cluster"
PIPELINE_FILES = ["pseudo_labels.yaml", "router.yaml", "selfplay.yaml", "arena.yaml", "distill.yaml"]
CLUSTER_EXAMPLES = {p.stem: [p.name] for p in CLUSTER.glob("*.yaml")} | {"all": PIPELINE_FILES}

# What config.json of each model family the examples name holds (the fields that decide memory and
# context; the Hugging Face hub's values) and the chat template of its tokenizer_config.json.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + "
    "eos_token }}{% elif message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + eos_token }}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}{% endfor %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + "
    "message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
_LLAMA3_8B = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096,
                  intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                  tie_word_embeddings=False, torch_dtype="bfloat16")
MODEL_FAMILIES = {
    "Llama-3.1-8B-Instruct": (_LLAMA3_8B, LLAMA3_TEMPLATE),
    "Llama-3.1-8B": (_LLAMA3_8B, LLAMA3_TEMPLATE),
    "Llama-3.1-70B-Instruct": ({**_LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672,
                                "num_hidden_layers": 80, "num_attention_heads": 64}, LLAMA3_TEMPLATE),
    "Meta-Llama-3-8B-Instruct": ({**_LLAMA3_8B, "max_position_embeddings": 8192}, LLAMA3_TEMPLATE),
    "zephyr-7b-sft-full": (dict(model_type="mistral", architectures=["MistralForCausalLM"], hidden_size=4096,
                                intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768,
                                sliding_window=4096, tie_word_embeddings=False, torch_dtype="bfloat16"),
                           ZEPHYR_TEMPLATE),
    "gemma-2-9b-it": (dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], hidden_size=3584,
                           intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                           num_key_value_heads=8, head_dim=256, vocab_size=256000, max_position_embeddings=8192,
                           sliding_window=4096, tie_word_embeddings=True, torch_dtype="float32"),
                      GEMMA_TEMPLATE),
}

# The nodes the examples are sized for (the header of every file in config/cluster/).
GPU_NODE = {"gpus": 8, "gpu_gb": 80, "cpus": 96, "mem_mb": 1_000_000}
CPU_NODE = {"cpus": 32, "mem_mb": 256_000}


def parameters(c: dict) -> int:
    """A decoder's parameter count from its config.json (embeddings, attention, gated MLP)."""
    h, hd = c["hidden_size"], c.get("head_dim", c["hidden_size"] // c["num_attention_heads"])
    attn = 2 * h * c["num_attention_heads"] * hd + 2 * h * c["num_key_value_heads"] * hd
    embed = c["vocab_size"] * h * (1 if c["tie_word_embeddings"] else 2)
    return embed + c["num_hidden_layers"] * (attn + 3 * h * c["intermediate_size"])


def test_model_family_shapes_give_their_published_sizes():
    sizes = {name: parameters(cfg) / 1e9 for name, (cfg, _) in MODEL_FAMILIES.items()}
    assert sizes == pytest.approx({"Llama-3.1-8B-Instruct": 8.03, "Llama-3.1-8B": 8.03,
                                   "Meta-Llama-3-8B-Instruct": 8.03, "Llama-3.1-70B-Instruct": 70.55,
                                   "zephyr-7b-sft-full": 7.24, "gemma-2-9b-it": 9.24}, abs=0.01)


def _stub_model(folder: Path) -> None:
    """A model folder as a dry run sees it: its family's config.json and tokenizer files, no weights."""
    from tokenizers import Tokenizer, models

    other = (dict(model_type="llama", architectures=["LlamaForCausalLM"]), "{{ messages }}")
    cfg, template = MODEL_FAMILIES.get(folder.name, other)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    Tokenizer(models.WordLevel({"<unk>": 0, "hi": 1}, unk_token="<unk>")).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))


def _stubbed(config: dict, tmp: Path) -> dict:
    """A shipped cluster config with its absolute paths replaced by stubs under tmp (model folders
    under models.*.path, data files elsewhere), repository paths made absolute, results under tmp."""
    c = _absolute(config)

    def stub(node, at=()):
        if isinstance(node, dict):
            return {k: stub(v, at + (k,)) for k, v in node.items()}
        if isinstance(node, list):
            return [stub(v, at) for v in node]
        if isinstance(node, str) and node.startswith("/") and not Path(node).exists():
            target = tmp / "stub" / node.lstrip("/")
            if at[0] == "models":
                _stub_model(target)
            elif not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(json.dumps({"id": "x", "text": "hi", "data": ["hi", "hello"]}) + "\n")
            return str(target)
        return node

    c = stub(c)
    if "results" in c:
        c["results"] = str(tmp / "results")
    return c


def layered(configs: list[dict]) -> dict:
    """Config files merged as Snakemake merges --configfile a b c: mappings key by key, later files
    win, anything else (lists too) replaced."""
    def merge(a, b):
        if isinstance(a, dict) and isinstance(b, dict):
            return {**a, **{k: merge(a[k], v) if k in a else v for k, v in b.items()}}
        return b

    out: dict = {}
    for c in configs:
        out = merge(out, c)
    return out


def planned_jobs(output: str) -> list[dict]:
    """Every job of a dry run's output: rule, wildcards, threads and resources (groups' members too)."""
    jobs = []
    for block in re.split(r"^\s*(?:local)?(?:rule|checkpoint) (?=\w+:$)", output, flags=re.M)[1:]:
        rule, _, body = block.partition(":\n")
        fields = dict(re.findall(r"^\s+(\w+): (.*)$", body.split("\n[")[0], re.M))
        res = dict(kv.split("=", 1) for kv in fields.get("resources", "").split(", ") if "=" in kv)
        jobs.append({"rule": rule, "wildcards": fields.get("wildcards", ""),
                     "threads": int(fields.get("threads", 1)),
                     "resources": {k: int(v) if v.isdigit() else v for k, v in res.items()}})
    return jobs


# The config key of each rule's resources (config/cluster/*.yaml, resources.<kind>), and the GPUs the
# pipeline's layout gives it, as the examples' comments size them.
RULE_KIND = {
    "generate_shard": "pseudo_labels.generate", "selfplay_generate": "selfplay.generate",
    "arena_generate": "arena.generate", "router_train": "router.train", "router_consolidate": "router.consolidate",
    "router_score": "router.score", "selfplay_train": "selfplay.train", "selfplay_eval": "selfplay.eval",
    "arena_train": "arena.train", "arena_predict": "arena.predict", "arena_export": "arena.export",
    "arena_export_ensemble": "arena.export", "distill_init_student": "distill.init",
    "distill_stage": "distill.stage", "distill_eval": "distill.eval",
    "build_tokenizer": "assets", "build_model": "assets",
}


def expected_gpus(c: dict, job: dict) -> int:
    """The GPUs a job's layout needs: a pool's servers x its model's tensor_parallel_size, a trainer's
    GPU setting, a distillation stage's teachers and ranks."""
    def pool(role, servers):
        tp = {**c["serve"], **c["models"][role].get("serve", {})}["tensor_parallel_size"]
        return servers * tp if c["serve"]["gpu"] else 0

    from modelmake.launch import world_size

    def trained(section):  # a training job: one GPU per process of its scale
        return world_size(c[section]["scale"]) if c[section]["scale"]["gpu"] else 0

    generator = re.search(r"generator=([\w.-]+)", job["wildcards"])
    s = c.get("distill", {}).get("service", {})
    return {
        "generate_shard": lambda: pool(c["pseudo_labels"]["teacher"], c["serve"]["servers_per_partition"]),
        "selfplay_generate": lambda: pool(c["selfplay"]["sft_model"], c["selfplay"]["world_size"]),
        "arena_generate": lambda: pool(generator and generator[1], c["arena"]["response_pairs"]["servers"]),
        "router_train": lambda: trained("router"), "router_score": lambda: c["router"]["score"]["gpu"],
        "selfplay_train": lambda: trained("selfplay"),
        "arena_train": lambda: trained("arena"), "arena_predict": lambda: int(c["arena"]["scale"]["gpu"]),
        "arena_export": lambda: c["resources"]["arena"]["export"]["gpus"],
        "arena_export_ensemble": lambda: c["resources"]["arena"]["export"]["gpus"],
        "distill_stage": lambda: s["groups"] * (s["ranks_per_group"] + 1) if c["distill"]["scale"]["gpu"] else 0,
        "distill_eval": lambda: c["resources"]["distill"]["eval"]["gpus"],
    }.get(job["rule"], lambda: 0)()


def _lookup(c: dict, key: str):
    for k in key.split("."):
        c = c[k]
    return c


@pytest.mark.parametrize("example", sorted(CLUSTER_EXAMPLES))
def test_cluster_example_dry_runs_through_the_slurm_profile_with_sized_gpu_jobs(tmp_path, example):
    """Each cluster example, on stub model folders of its families' shapes, planned through
    profiles/slurm: every job on one node of its partition with the example's memory, runtime and
    cores, every GPU job with its layout's GPUs, and all of it within the nodes the examples are sized for."""
    from modelmake.config import generating_roles, role_serve, validate

    files = CLUSTER_EXAMPLES[example]
    raw = [yaml.safe_load((CLUSTER / f).read_text()) for f in files]
    paths = []
    for f, c in zip(files, raw):
        paths.append(write_config(tmp_path, _stubbed(c, tmp_path), name=f))
    write_config(tmp_path, small_config(tmp_path))  # the checkout's demo config.yaml: must not leak in
    c = validate(layered([_stubbed(x, tmp_path) for x in raw]), check_paths=False)
    if "selfplay" in c:
        _selfplay_fractions_built(c, Path(c["results"]), fractions=2)
    out = run_snakemake(tmp_path, "-n", "--profile", str(REPO / "profiles/slurm"),
                        "--configfile", *map(str, paths)).stdout

    jobs = [j for j in planned_jobs(out) if j["rule"] != "all"]
    sections = c.keys() & PIPELINE_RULES.keys()
    wanted = set().union(*(PIPELINE_RULES[s] for s in sections))
    wanted |= {"selfplay_generate"} if "selfplay" in c else set()
    assert sections and {j["rule"] for j in jobs} >= wanted - {
        "selfplay_prompts", "selfplay_fractions", "router_consolidate"}  # built here already; deepspeed only
    gpu_jobs = 0
    for j in jobs:
        r, where = j["resources"], f"{example}: {j['rule']} {j['wildcards']}"
        kind = _lookup(c["resources"], RULE_KIND.get(j["rule"], "data"))
        gpus = expected_gpus(c, j)
        assert r["gpu"] == gpus, where
        assert r["nodes"] == 1, where
        assert r["slurm_partition"] == c["resources"]["partitions"]["gpu" if gpus else "cpu"], where
        assert r["mem_mb"] == kind["mem_mb"], where
        runtime = c["serve"]["runtime_per_shard_min"] if j["rule"] == "generate_shard" else kind["runtime"]
        assert r["runtime"] == runtime, where
        assert r["cpus_per_task"] == kind["cpus"], where  # what SLURM allocates
        assert j["threads"] == min(kind["cpus"], 2), where  # Snakemake caps threads at --cores (2 here)
        node = GPU_NODE if gpus else CPU_NODE
        assert gpus <= GPU_NODE["gpus"] and kind["cpus"] <= node["cpus"] and r["mem_mb"] <= node["mem_mb"], where
        gpu_jobs += bool(gpus)
    assert gpu_jobs, f"{example}: no GPU job planned"

    # every served model fits its servers' GPUs (bf16 weights within 80% of what vLLM may take) and
    # every conversation its context
    for key, roles in generating_roles(c).items():
        for role in roles:
            s = role_serve(c, role)
            shape = json.loads((Path(c["models"][role]["path"]) / "config.json").read_text())
            weights_gb = parameters(shape) * 2 / 1e9
            room_gb = s["tensor_parallel_size"] * GPU_NODE["gpu_gb"] * (s["gpu_memory_utilization"] or 0.9)
            assert weights_gb <= 0.8 * room_gb, f"{example}: {role} ({weights_gb:.0f} GB) on {room_gb:.0f} GB"
            assert _lookup(c, key)["max_conversation_tokens"] <= s["max_model_len"] <= shape["max_position_embeddings"]


def _selfplay_fractions_built(c: dict, results: Path, fractions: int) -> None:
    """Self-play's prompts and fractions as if built (in input order, so none is stale): the
    checkpoint's output exists, and the dry run plans every generation job after it."""
    sp, stamp = c["selfplay"], time.time() - 1000
    data, splits = results / "data" / sp["dataset"] / "reformatted", (sp["train_split"], sp["test_split"])
    built = [Path(f) for split in splits for f in c["datasets"][sp["dataset"]]["splits"][split]]  # the raw files
    built += [data / f"{split}{suffix}" for split in splits for suffix in (".parquet", ".rejects.jsonl", ".stats.json")]
    run = results / "selfplay" / sp["run"] / "data"
    built += [run / "train.parquet", run / "test.parquet"]
    for part in ("train", "test"):
        folder = run / f"{part}_fractions"
        folder.mkdir(parents=True)
        for k in range(fractions):
            (folder / f"frac{k}.jsonl").write_text("")
        (folder / "layout.json").write_text(json.dumps({"fractions": fractions}))
        built.append(folder)
    for i, path in enumerate(built):
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")
        os.utime(path, (stamp + i, stamp + i))


def test_slurm_profile_sizes_a_partitions_group_as_its_members_in_series():
    """profiles/slurm's per-allocation limits (gpu, nodes=1; local scope) make Snakemake size a group
    of generation jobs (one sbatch) as its members one after another, as the plugin runs them: one
    member's memory and cores, on one node, for the sum of their runtimes, with or without GPUs.
    (Snakemake's own group sizing, called through its internal GroupResources.)"""
    from types import SimpleNamespace

    from snakemake.resources import GroupResources, Resources

    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    assert set(profile["set-resource-scopes"]) == {"gpu=local", "nodes=local"}
    limits = Resources.parse(profile["resources"], allow_expressions=False)
    for gpus in (0, 4, 8):
        member = {"_cores": 36, "cpus_per_task": 36, "mem_mb": 128000, "runtime": 60, "gpu": gpus, "nodes": 1}
        jobs = [[SimpleNamespace(resources=dict(member), pipe_group=None) for _ in range(8)]]
        group = GroupResources.basic_layered(jobs, constraints=limits, run_local=False,
                                             additive_resources=["runtime"], sortby=["runtime"])
        assert {k: group[k] for k in member} == {**member, "runtime": 8 * 60}, gpus


def test_every_cluster_example_file_is_in_an_example():
    shipped = {p.name for p in CLUSTER.glob("*.yaml")}
    assert shipped == set().union(*map(set, CLUSTER_EXAMPLES.values()))


@pytest.mark.parametrize("example", ["pseudo_labels", "router"])
def test_a_cluster_example_dry_runs_locally_too(tmp_path, example):
    """Without the slurm profile the same plan runs on the local executor (threads capped by --cores)."""
    paths = [write_config(tmp_path, _stubbed(yaml.safe_load((CLUSTER / f).read_text()), tmp_path), name=f)
             for f in CLUSTER_EXAMPLES[example]]
    write_config(tmp_path, small_config(tmp_path))
    planned = jobs_planned(run_snakemake(tmp_path, "-n", "--configfile", *map(str, paths)).stdout)
    assert planned.keys() & PIPELINE_RULES[example]


# --- one build across pipelines

def job_inputs(output: str, rule: str) -> list[list[str]]:
    """The inputs of every planned job of ``rule`` in a dry run's output (one list per job)."""
    found = []
    for block in re.split(r"^\s*(?:local)?(?:rule|checkpoint) (?=\w+:$)", output, flags=re.M)[1:]:
        name, _, body = block.partition(":\n")
        if name == rule:
            m = re.search(r"^\s+input: (.*)$", body, re.M)
            found.append(m[1].split(", ") if m else [])
    return found


def test_the_demos_distillation_trains_on_the_teachers_pseudo_labels(tmp_path):
    """The edge pseudo-labels -> distillation: the distillation's chat data job reads every dataset's
    labels.parquet (distill.chat.pseudo_labels in config.yaml), so the demo plans one flow."""
    c = small_config(tmp_path)
    write_config(tmp_path, c)
    out = run_snakemake(tmp_path, "-n", str(tmp_path / "results/distill/demo/data/chat/train.parquet")).stdout
    (inputs,) = job_inputs(out, "distill_chat_data")
    labels = [str(tmp_path / f"results/pseudo_labels/{d}/teacher/labels.parquet") for d in c["pseudo_labels"]["datasets"]]
    assert set(labels) <= set(inputs) and not any("/reformatted/" in i for i in inputs)
    planned = jobs_planned(out)
    assert planned["merge_pseudo_labels"] == 2 and planned["generate_shard"] == 4


CHAIN = {"sp_iter0": {"built": "selfplay/iter0"}, "sp_iter1": {"built": "selfplay/iter1"}}


def chain_config(workdir: Path) -> dict:
    """The demo with arena response pairs generated by self-play's iterations 0 and 1."""
    c = small_config(workdir)
    c["models"].update(CHAIN)
    c["arena"]["response_pairs"]["generators"] = list(CHAIN)
    return c


def test_a_built_model_role_chains_pipelines_in_the_dag(tmp_path):
    """models.<role>.built: the arena's generators are self-play models; the dry run plans self-play's
    training before the arena's generation, whose jobs take the iterations' model folders as inputs."""
    write_config(tmp_path, chain_config(tmp_path))
    out = run_snakemake(tmp_path, "-n", "-p", str(tmp_path / "results/arena/demo/pairs/pairs.parquet")).stdout
    planned = jobs_planned(out)
    assert planned["selfplay_train"] == 2 and planned["arena_generate"] == 2 and planned["arena_pairs"] == 1
    inputs = job_inputs(out, "arena_generate")
    for t in (0, 1):
        model = str(tmp_path / f"results/selfplay/demo/iter{t}/model")
        assert any(model in i for i in inputs), (model, inputs)
        assert f'"model": "{model}"' in out.replace('":"', '": "')  # the pool serves that folder
    assert "build_model" in planned and "arena_train" not in planned  # the pairs need no classifier


def test_every_report_item_is_in_its_pipelines_section_with_a_caption_that_says_what_to_look_for(tmp_path):
    """snakemake --report: each figure and table under its pipeline's category, a subcategory, and a
    caption file that exists and says what to look for; every pipeline has a section."""
    from snakemake.api import SnakemakeApi
    from snakemake.io import get_flag_value, is_flagged
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings, StorageSettings

    write_config(tmp_path, small_config(tmp_path))
    sections = {"pseudo_labels": "Pseudo-labels", "router": "Router", "selfplay": "Self-play", "arena": "Arena",
                "distill": "Distillation"}
    rule_pipeline = {r: p for p, rules in PIPELINE_RULES.items() for r in rules}
    seen = set()
    with SnakemakeApi(OutputSettings()) as api:
        wf = api.workflow(snakefile=REPO / "Snakefile", workdir=tmp_path,
                          config_settings=ConfigSettings(configfiles=[tmp_path / "config.yaml"]),
                          resource_settings=ResourceSettings(cores=1), storage_settings=StorageSettings())
        for rule in wf._workflow.rules:
            for f in rule.output:
                if not is_flagged(f, "report"):
                    continue
                item = get_flag_value(f, "report")
                assert item.category == sections[rule_pipeline[rule.name]], (rule.name, item.category)
                assert item.subcategory, rule.name
                caption = Path(item.caption)
                assert caption.is_file() and "**Look for:**" in caption.read_text(), caption
                seen.add(item.category)
    assert seen == set(sections.values())
    assert "python -m modelmake trace" in (REPO / "report/workflow.rst").read_text()
