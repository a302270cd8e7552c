"""One way to scale training (modelmake.launch): the launch command and resources every training rule
takes from its section's ``scale``, the old keys' mapping, and multi-process CPU training.

The slow tests train arena and self-play on 2 gloo processes under torchrun (the command a rule runs),
kill the launcher's process group by PID after the first checkpoint, rerun, and load the model folder
to score or generate. The router's 2-process ZeRO-3 run (killed and resumed too) is in
test_router_consolidate.py; distillation's 2 trainer ranks (killed and resumed) in test_distill_workflow.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, env, pid_alive, run_snakemake, small_config, wait_until, write_config
from modelmake.errors import ConfigError, UserError
from modelmake.launch import launch_command, scale_resources, scale_settings, trainer_args

# --- the launch command and the job's resources


def test_one_process_runs_python_and_n_processes_run_torchrun_on_one_node():
    assert launch_command({}) == "python"
    assert launch_command({"processes": 1, "gpu": True}) == "python"
    assert launch_command({"processes": 4}) == "torchrun --standalone --nproc_per_node 4 --no-python -- python"


def test_torchrun_passes_every_argument_of_the_entry_point_unread(tmp_path):
    """selfplay-train's --start abbreviates torchrun's --start-method: torchrun must not parse it."""
    (tmp_path / "argv_entry.py").write_text("import os, sys; print(os.environ['RANK'], sys.argv[1:])")
    cmd = f"{launch_command({'processes': 2})} -m argv_entry selfplay-train x --start y --node z --log-dir w"
    out = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env={**env(), "OMP_NUM_THREADS": "1"}, text=True,
                         capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    want = "['selfplay-train', 'x', '--start', 'y', '--node', 'z', '--log-dir', 'w']"
    assert sorted(out.stdout.splitlines()) == [f"0 {want}", f"1 {want}"]


def fake_slurm_tools(bin_dir: Path) -> None:
    """srun (runs its command once per node, SLURM_NODEID set), scontrol (the nodes of
    SLURM_JOB_NODELIST), torchrun (prints its arguments): enough to run a multi-node prefix here."""
    bin_dir.mkdir()
    tools = {
        "srun": """#!/bin/bash
nodes=1
while [[ $1 == --* ]]; do case $1 in --nodes) nodes=$2; shift 2;; --ntasks-per-node|--kill-on-bad-exit) shift 2;; *) shift;; esac; done
for ((i = 0; i < nodes; i++)); do SLURM_NODEID=$i "$@" || exit $?; done
""",
        "scontrol": """#!/bin/bash
[[ $1 == show && $2 == hostnames ]] && tr ',' '\\n' <<< "$3"
""",
        "torchrun": """#!/bin/bash
echo "node $SLURM_NODEID: torchrun $*"
""",
    }
    for name, text in tools.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)


def test_several_nodes_run_one_torchrun_per_node_meeting_on_the_first_node(tmp_path):
    prefix = launch_command({"processes": 8, "nodes": 2, "gpu": True})
    assert prefix.startswith("srun --nodes 2 --ntasks-per-node 1 ")
    fake_slurm_tools(tmp_path / "bin")
    e = {**env(), "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
         "SLURM_JOB_NODELIST": "gpu07,gpu12", "SLURM_JOB_ID": "4242"}
    out = subprocess.run(["bash", "-c", f"{prefix} -m modelmake router-train --out 'a b'"], env=e, text=True,
                         capture_output=True, check=True).stdout.splitlines()
    args = ("--nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_id 4242 --rdzv_endpoint gpu07:29400 "
            "--no-python -- python -m modelmake router-train --out a b")
    assert out == [f"node 0: torchrun {args}", f"node 1: torchrun {args}"]


def test_a_job_asks_for_one_gpu_per_process_and_its_nodes():
    assert scale_resources({}) == {"gpu": 0, "nodes": 1}
    assert scale_resources({"processes": 4}) == {"gpu": 0, "nodes": 1}  # gloo CPU processes
    assert scale_resources({"processes": 4, "gpu": True}) == {"gpu": 4, "nodes": 1}
    # across nodes: GPUs per node (gres), the srun left to the command (mpi), one task per node
    assert scale_resources({"processes": 8, "nodes": 2, "gpu": True}) == {
        "nodes": 2, "mpi": "srun", "tasks": 2, "gres": "gpu:8", "tasks_per_gpu": 0}
    assert scale_resources({"processes": 8, "nodes": 2}) == {"nodes": 2, "mpi": "srun", "tasks": 2}
    assert scale_resources({"gpu": True}, processes=6) == {"gpu": 6, "nodes": 1}  # a pipeline's own layout


def test_trainer_args_follow_the_settings_on_cpu(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = trainer_args({"processes": 2, "precision": "bf16", "gradient_checkpointing": True})
    assert args["bf16"] and not args["fp16"] and args["use_cpu"] and args["ddp_backend"] == "gloo"
    assert args["gradient_checkpointing"] and args["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    assert args["deepspeed"] is None and args["accelerator_config"] is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert trainer_args({})["ddp_backend"] is None and trainer_args({})["bf16"] is False


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks what a CPU-only process refuses")
def test_gpu_without_cuda_and_fp16_on_cpu_are_refused():
    with pytest.raises(UserError, match="scale.gpu is true but this process sees no CUDA device"):
        trainer_args({"gpu": True})
    with pytest.raises(UserError, match="fp16 needs GPUs"):
        trainer_args({"precision": "fp16"})


def test_unknown_scale_keys_are_refused_with_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"router.scale: unknown keys \['procs'\]; allowed: \[.*'processes'"):
        scale_settings({"procs": 2}, "router.scale")
    assert scale_settings({"lora": {"r": 4}})["lora"] == {"r": 4, "alpha": 16, "dropout": 0.0,
                                                          "target_modules": "all-linear"}


@pytest.mark.parametrize("tied", [True, False])
def test_lora_trains_the_added_tokens_rows_of_the_input_and_the_output_embeddings(tied):
    """The router's label tokens start random: with LoRA their rows must train in the lm_head too,
    also where the model does not tie it to the input embeddings (peft's default: input rows only)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from modelmake.launch import apply_lora, merged

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg)
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    peft_model = apply_lora(model, {"r": 4, "alpha": 8}, trainable_tokens=[45, 46])
    ids = torch.randint(0, 40, (2, 8))
    ids[:, 2] = 45  # the added tokens in the input (their input rows get a gradient) and as targets
    labels = torch.where(torch.arange(8) % 2 == 0, 45, 46).expand(2, 8)
    peft_model(input_ids=ids, labels=labels).loss.backward()
    torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0).step()
    plain = merged(peft_model)
    changed = lambda after, before: (after - before).abs().sum(1).nonzero().flatten().tolist()  # noqa: E731
    assert changed(plain.get_output_embeddings().weight, before_out) == [45, 46]
    assert 45 in changed(plain.get_input_embeddings().weight, before_in)


def test_the_slurm_plugin_submits_a_multi_node_job_with_gpus_per_node_and_one_task_per_node():
    """What snakemake-executor-plugin-slurm's sbatch line (and its jobstep's call) make of the resources."""
    from types import SimpleNamespace

    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    class Resources(dict):
        __getattr__ = dict.__getitem__

    job = SimpleNamespace(resources=Resources(scale_resources({"processes": 8, "nodes": 2, "gpu": True}),
                                              runtime=600, mem_mb=8000), threads=2)
    params = {"run_uuid": "r", "slurm_logfile": "l", "comment_str": "c", "account": "", "partition": "-p gpu",
              "workdir": "/w"}
    sbatch = get_submit_command(job, params) + set_gres_string(job)
    assert " --nodes=2" in sbatch and " --ntasks=2" in sbatch and " --gres=gpu:8" in sbatch
    assert "--gpus" not in sbatch and "--ntasks-per-gpu" not in sbatch
    one = SimpleNamespace(resources=Resources(scale_resources({"processes": 4, "gpu": True}), runtime=600), threads=2)
    assert " --gpus=4" in get_submit_command(one, params) + set_gres_string(one)


# --- config: one `scale` per pipeline, the old keys mapped onto it


def validated(**overrides):
    from modelmake.config import validate

    c = small_config(Path("/tmp/unused"), **overrides)
    for section in ("router", "distill", "arena"):  # the demo's new keys out, so the old ones can speak
        c[section].pop("scale", None)
    return validate(c)


def test_old_scale_keys_are_mapped_onto_the_sections_scale():
    zero3 = str(REPO / "config/router/zero3.json")
    c = validated(**{"router.train.processes": 2, "router.train.bf16": True, "router.train.deepspeed": zero3,
                     "router.train.gradient_checkpointing": True, "arena.gpu": 1, "selfplay.train_gpus": 2,
                     "distill.service.gpu": True, "distill.deepspeed": zero3})
    assert {k: c["router"]["scale"][k] for k in ("processes", "precision", "deepspeed", "gradient_checkpointing",
                                                 "gpu")} == {"processes": 2, "precision": "bf16", "deepspeed": zero3,
                                                             "gradient_checkpointing": True, "gpu": False}
    assert not {"processes", "bf16", "deepspeed", "gradient_checkpointing"} & set(c["router"]["train"])
    assert c["arena"]["scale"]["gpu"] is True and "gpu" not in c["arena"]
    assert (c["selfplay"]["scale"]["gpu"], c["selfplay"]["scale"]["processes"]) == (True, 2)
    assert (c["distill"]["scale"]["gpu"], c["distill"]["scale"]["deepspeed"]) == (True, zero3)
    assert "gpu" not in c["distill"]["service"]


def test_an_old_key_that_disagrees_with_the_new_one_is_refused_naming_both():
    from modelmake.config import validate

    c = small_config(Path("/tmp/unused"), **{"router.train.processes": 2})
    c["router"]["scale"]["processes"] = 4
    with pytest.raises(ConfigError, match=r"router.train.processes \(the old name of router.scale.processes\) "
                                          r"and router.scale.processes disagree: 2 vs 4"):
        validate(c)


@pytest.mark.parametrize("section, scale, message", [
    ("router", {"precision": "fp16"}, "router.scale.precision: fp16 needs GPUs"),
    ("router", {"lora": {"r": 4}, "deepspeed": "config/router/zero3.json"}, "router.scale.lora: not with deepspeed"),
    ("arena", {"deepspeed": "config/router/zero3.json"}, "arena.scale.deepspeed: ZeRO-3 shards the weights"),
    ("distill", {"processes": 2}, "distill.scale: processes and nodes stay 1"),
    ("distill", {"lora": {"r": 4}}, "distill.scale.lora: this pipeline does not offer LoRA"),
])
def test_what_a_pipeline_does_not_offer_is_refused_by_key(section, scale, message):
    from modelmake.config import validate

    c = small_config(Path("/tmp/unused"))
    c[section]["scale"] = {k: str(REPO / v) if k == "deepspeed" else v for k, v in scale.items()}
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate(c)


def test_dry_run_starts_each_training_rule_with_the_launcher_and_asks_for_its_gpus_and_nodes(tmp_path):
    c = small_config(tmp_path)
    c["router"]["scale"] = {"processes": 8, "nodes": 2, "gpu": True, "precision": "bf16"}
    c["arena"]["scale"] = {"processes": 2}
    c["selfplay"]["scale"] = {"processes": 2, "lora": {"r": 4}}
    c["distill"]["scale"] = {"gpu": True}
    write_config(tmp_path, c)
    out = run_snakemake(tmp_path, "-n", "-p").stdout
    jobs = {}
    for block in out.split("\n\n"):
        rule = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        if rule:
            jobs.setdefault(rule.group(1), block)
    assert "srun --nodes 2 --ntasks-per-node 1 --kill-on-bad-exit 1 torchrun --nnodes 2 --nproc_per_node 8" in \
        jobs["router_train"]
    def resources(rule):
        line = re.search(r"^\s*resources: (.*)$", jobs[rule], re.M).group(1)
        return dict(kv.split("=", 1) for kv in line.split(", "))

    r = resources("router_train")
    assert {k: r.get(k) for k in ("nodes", "mpi", "tasks", "gres", "tasks_per_gpu", "gpu", "slurm_partition")} == {
        "nodes": "2", "mpi": "srun", "tasks": "2", "gres": "gpu:8", "tasks_per_gpu": "0", "gpu": None,
        "slurm_partition": "gpu"}
    for rule in ("arena_train", "selfplay_train"):
        assert "torchrun --standalone --nproc_per_node 2 --no-python -- python -m modelmake" in jobs[rule], rule
        assert (resources(rule)["gpu"], resources(rule)["nodes"]) == ("0", "1"), rule
    # 2 groups x (1 trainer + 1 teacher), one GPU each
    assert (resources("distill_stage")["gpu"], resources("distill_stage")["nodes"]) == ("4", "1")


# --- two gloo processes on the CPU: killed after the first checkpoint, resumed


def launched(scale: dict, *args: str) -> list[str]:
    """The command a training rule runs: the launcher of ``scale`` and a modelmake entry point."""
    return [*shlex.split(launch_command(scale)), "-m", "modelmake", *args, "--scale", json.dumps(scale)]


def kill_after_first_checkpoint(cmd: list[str], ckpt: Path, log: Path, cwd: Path) -> str:
    """Start ``cmd`` in a session of its own, SIGKILL its process group (by the launcher's PID) once
    ``ckpt`` holds a complete checkpoint; every worker must die with it. Returns that checkpoint."""
    e = {**env(), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src"), "PYTHONWARNINGS": "ignore"}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=e, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    workers: list[int] = []
    try:
        import psutil

        def first():
            if proc.poll() is not None:
                return "exited"
            workers[:] = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)] or workers
            done = sorted(ckpt.glob("checkpoint-*/trainer_state.json"))
            return done[0].parent.name if done else None

        got = wait_until(first, timeout=400, poll=0.05, what=f"a first checkpoint in {ckpt}")
        assert got != "exited", f"the run ended before it was killed:\n{log.read_text()[-3000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert len(workers) >= 2, workers
        wait_until(lambda: not any(pid_alive(p) for p in workers), timeout=30, what="the workers to die with torchrun")
        return got
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in workers:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def run_to_the_end(cmd: list[str], log: Path, cwd: Path) -> None:
    e = {**env(), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src"), "PYTHONWARNINGS": "ignore"}
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=cwd, env=e, stdout=f, stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, log.read_text()[-5000:]


def tiny_llama_folder(root: Path, texts: list, hidden: int = 32, max_len: int = 256) -> Path:
    """root/model: a tiny random Llama with a BPE tokenizer (the project's chat template) trained on
    ``texts`` (strings: user turns; or conversations, lists of messages)."""
    import pandas as pd
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from modelmake.assets import build_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    convs = [[{"role": "user", "content": t}] if isinstance(t, str) else t for t in texts]
    pd.DataFrame({"id": [str(i) for i in range(len(convs))], "messages": convs}).to_parquet(root / "c.parquet")
    build_tokenizer([root / "c.parquet"], root / "model", vocab_size=400)
    tok = AutoTokenizer.from_pretrained(root / "model")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_len,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    return root / "model"


@pytest.mark.slow
def test_arena_stage_on_two_gloo_processes_killed_then_resumed_scores_pairs(tmp_path):
    from test_arena import WORDS, pairs_frame

    from modelmake.arena.model import load_classifier, load_tokenizer, predict
    from modelmake.arena.template import TemplateSettings
    from modelmake.files import read_json

    from modelmake.arena import template

    fixed = [template.INSTRUCTION, template.PROMPT_HEADER, template.A_HEADER, template.B_HEADER, template.VERDICT_CUE]
    base = tiny_llama_folder(tmp_path / "base", (WORDS + fixed) * 4)
    labelled = tmp_path / "labelled.parquet"
    pairs = pairs_frame(n=60)
    pairs.to_parquet(labelled)
    # 40 training pairs x 2 (swapped) / (4 per process x 2 processes): 10 steps, a checkpoint every 2
    settings = {"template": {"max_length": 96, "head_share": 0.5}, "valid_fold": 0,
                "train": {"epochs": 1, "lr": 0.002, "batch_size": 4, "save_steps": 2}}
    scale = {"processes": 2, "precision": "bf16", "gradient_checkpointing": True}
    out, ckpt = tmp_path / "stage1" / "model", tmp_path / "ckpt"
    cmd = launched(scale, "arena-train", "--init", str(base), "--labelled", str(labelled), "--out", str(out),
                   "--ckpt", str(ckpt), "--eval-out", str(tmp_path / "eval.parquet"),
                   "--loss-plot", str(tmp_path / "loss.png"), "--settings", json.dumps(settings), "--name", "s1")
    killed_at = kill_after_first_checkpoint(cmd, ckpt, tmp_path / "killed.log", tmp_path)
    assert not out.exists()
    run_to_the_end(cmd, tmp_path / "resumed.log", tmp_path)

    prov = read_json(out / "provenance.json")
    counts = prov["counts"]
    assert counts["resumed_from"] is not None and int(counts["resumed_from"].split("-")[1]) >= int(killed_at.split("-")[1])
    assert (counts["steps"], counts["processes"]) == (10, 2)
    assert prov["config"]["scale"]["precision"] == "bf16"
    tok = load_tokenizer(out)
    model = load_classifier(out, tok)
    valid = pairs[pairs["fold"] == 0]
    p = predict(model, tok, valid, TemplateSettings(max_length=96))
    assert len(p) == len(valid) and all(0 < x < 1 for x in p)
    assert (tmp_path / "eval.json").exists()


@pytest.mark.slow
def test_selfplay_iteration_with_lora_on_two_gloo_processes_killed_then_resumed_generates(tmp_path):
    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modelmake.files import read_json
    from test_selfplay_trainer import kto_rows

    texts = [f"question {i} about topic {i % 5}? answer {i} no idea" for i in range(40)]
    start = tiny_llama_folder(tmp_path / "start", texts)
    data = tmp_path / "train.parquet"
    pd.DataFrame(kto_rows(16)).to_parquet(data)  # 32 rows / (4 per process x 2): 4 steps per epoch
    settings = {"beta": 0.1, "prior": 0.3, "learning_rate": 5e-3, "epochs": 2, "batch_size": 4, "save_steps": 2}
    scale = {"processes": 2, "lora": {"r": 4, "alpha": 8}}
    out, ckpt = tmp_path / "iter0" / "model", tmp_path / "iter0" / "ckpt"
    cmd = launched(scale, "selfplay-train", str(data), "--start", str(start), "--out", str(out), "--ckpt", str(ckpt),
                   "--settings", json.dumps(settings), "--loss-plot", str(tmp_path / "loss.png"))
    killed_at = kill_after_first_checkpoint(cmd, ckpt, tmp_path / "killed.log", tmp_path)
    assert (ckpt / killed_at / "adapter_model.safetensors").exists()  # LoRA: the checkpoint holds adapters
    run_to_the_end(cmd, tmp_path / "resumed.log", tmp_path)

    counts = read_json(out / "provenance.json")["counts"]
    assert counts["resumed_from"] is not None and (counts["steps"], counts["processes"]) == (8, 2)
    assert not ckpt.exists()
    model = AutoModelForCausalLM.from_pretrained(out)  # merged: a plain model folder
    assert not any("lora" in n for n, _ in model.named_parameters())
    before = AutoModelForCausalLM.from_pretrained(start)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, dict(before.named_parameters())[n])]
    assert moved and all(n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                                     "gate_proj.weight", "up_proj.weight", "down_proj.weight")) for n in moved), moved
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok.apply_chat_template([{"role": "user", "content": "question 3 about topic 3?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gen = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > enc["input_ids"].shape[1]
