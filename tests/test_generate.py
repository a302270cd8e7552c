"""generate.py without vLLM: turn-by-turn generation, truncation, retries, failure share, resume.

The real teacher server is vLLM. These unit tests need failures on demand (503s, 400s, exact token
counts), so they talk to ``FakeChatServer``, a small in-process stand-in for vLLM's OpenAI chat
endpoint on 127.0.0.1 with an ephemeral port. The client code under test (httpx, retries, journal,
output) is the real one.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import shutil
import socket
import threading
from pathlib import Path

import pytest

from modelmake.errors import GenerationError, RecordError, UserError
from modelmake.files import dumps
from modelmake.generate import (GenerateSettings, Sampling, generate_shard, input_digest, journal_path,
                                request_seed)


class FakeChatServer:
    """A stand-in for vLLM, used only to inject failures into unit tests; not a model server.

    Answers ``POST /v1/chat/completions`` with ``"echo:" + <last user message>``, records every
    request body, fails the first ``fail_first`` requests with 503, answers 400 to any request
    whose messages contain ``bad_marker``, and reports token usage computed by ``usage(body)``
    (default: whitespace-separated words of the prompt and of the answer).
    """

    def __init__(self):
        self.requests: list[dict] = []
        self.authorizations: list[str | None] = []  # each request's Authorization header
        self.statuses: list[int] = []
        self.fail_first = 0
        self.bad_marker: str | None = None
        self.usage = lambda body, answer: (
            sum(len(m["content"].split()) for m in body["messages"]), len(answer.split()))
        self._lock = threading.Lock()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.authorizations.append(self.headers.get("Authorization"))
                status, reply = fake._answer(self.path, body)
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    def _answer(self, path: str, body: dict) -> tuple[int, dict]:
        with self._lock:
            self.requests.append(body)
            n = len(self.requests)
            if path != "/v1/chat/completions":
                status, reply = 404, {"error": "not found"}
            elif n <= self.fail_first:
                status, reply = 503, {"error": "injected 503"}
            elif self.bad_marker and any(self.bad_marker in m["content"] for m in body["messages"]):
                status, reply = 400, {"error": "injected 400"}
            else:
                last_user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
                answer = "echo:" + last_user
                prompt, completion = self.usage(body, answer)
                status, reply = 200, {
                    "choices": [{"message": {"role": "assistant", "content": answer},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": prompt, "completion_tokens": completion},
                }
            self.statuses.append(status)
            return status, reply

    def factory(self):
        """The ``server`` argument of generate_shard: a context manager factory yielding the URL."""
        return lambda: contextlib.nullcontext(self.url)

    def requests_containing(self, text: str) -> list[dict]:
        return [b for b in self.requests if any(text in m["content"] for m in b["messages"])]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)


@pytest.fixture
def fake_server(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    server = FakeChatServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def settings(**overrides) -> GenerateSettings:
    base = dict(model="teacher", sampling=Sampling(temperature=0.7, top_p=0.9, max_tokens=64, seed=3),
                config_key="pseudo_labels", teacher_source={"asset": "tiny-llama"}, concurrency=4, retries=2, backoff_s=0.001,
                request_timeout_s=10.0, max_failure_share=0.0)
    base.update(overrides)
    return GenerateSettings(**base)


def conv(*turns: str) -> list[dict]:
    """Alternating user/assistant messages."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def write_shard(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def simple_shard(tmp_path: Path, ids: list[str]) -> Path:
    return write_shard(tmp_path / "shard0.jsonl",
                       [{"id": i, "messages": conv(f"question {i}", f"original answer {i}")} for i in ids])


def refuse_server():
    """A server factory for shards that must not need one."""
    @contextlib.contextmanager
    def cm():
        raise AssertionError("the server was entered although nothing was left to generate")
        yield  # pragma: no cover
    return cm


# ---------------------------------------------------------------- turn by turn generation


def test_every_user_turn_is_answered_in_order_with_the_previous_generated_answers(tmp_path, fake_server):
    system = {"role": "system", "content": "be brief"}
    record = {"id": "r1", "messages": [system, *conv("u1", "ORIG-a1", "u2", "ORIG-a2", "u3")]}
    shard = write_shard(tmp_path / "shard0.jsonl", [record])
    s = settings(concurrency=1)
    out = tmp_path / "out" / "shard0.jsonl"

    counts = generate_shard(shard, out, fake_server.factory(), s, show_progress=False)

    [row] = read_rows(out)
    expected = [system, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "echo:u1"},
                {"role": "user", "content": "u2"}, {"role": "assistant", "content": "echo:u2"},
                {"role": "user", "content": "u3"}, {"role": "assistant", "content": "echo:u3"}]
    assert row["id"] == "r1"
    assert row["messages"] == expected  # the conversation ending in a user turn gets it answered
    assert "error" not in row
    # each request is the history so far: the system message, and the teacher's own answers
    assert [b["messages"] for b in fake_server.requests] == [expected[:2], expected[:4], expected[:6]]
    assert not fake_server.requests_containing("ORIG")
    for turn, body in enumerate(fake_server.requests):
        assert body["model"] == "teacher"
        assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.7, 0.9, 64)
        assert body["seed"] == request_seed(3, "r1", turn)
    gen = row["generation"]
    assert gen["turns"] == 3 and gen["finish_reasons"] == ["stop"] * 3 and gen["truncated"] is False
    assert gen["fingerprint"] == s.fingerprint()
    # usage is summed over the requests (default usage: words of prompt and answer)
    prompt_words = sum(len(m["content"].split()) for b in fake_server.requests for m in b["messages"])
    assert gen["usage"] == {"prompt_tokens": prompt_words, "completion_tokens": 3}
    assert counts["records"] == 1 and counts["generated"] == 1 and counts["failed"] == 0
    assert counts["completion_tokens"] == 3


def test_output_is_in_shard_order_and_original_trailing_assistant_turn_is_replaced(tmp_path, fake_server):
    ids = [f"id{i:02d}" for i in range(12)]
    shard = simple_shard(tmp_path, ids)
    out = tmp_path / "out" / "shard0.jsonl"

    generate_shard(shard, out, fake_server.factory(), settings(concurrency=4), show_progress=False)

    rows = read_rows(out)
    assert [r["id"] for r in rows] == ids
    for r in rows:
        assert r["messages"] == conv(f"question {r['id']}", f"echo:question {r['id']}")
    assert len(fake_server.requests) == len(ids)


# ---------------------------------------------------------------- tool turns, what is regenerated, unanswered ends


def tool_call(cid: str, name: str, arguments: str) -> dict:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": arguments}}


SYSTEM = {"role": "system", "content": "You can call get_weather."}
CALL = {"role": "assistant", "content": "", "tool_calls": [tool_call("call_0", "get_weather", '{"city": "Paris"}')]}
RESULT = {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_0", "name": "get_weather"}
TOOL_CONVERSATION = [  # the canonical shape modelmake.reformat writes (chat.plain_messages)
    SYSTEM, {"role": "user", "content": "Weather in Paris?", "name": "alice"}, CALL, RESULT,
    {"role": "assistant", "content": "ORIG it is 21"},
    {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": ""},  # an empty answer
    {"role": "user", "content": "Bye"},  # ends on a user turn
]


def test_tool_turns_are_sent_as_context_and_every_other_assistant_turn_is_regenerated(tmp_path, fake_server):
    shard = write_shard(tmp_path / "shard0.jsonl", [{"id": "t1", "messages": TOOL_CONVERSATION}])
    out = tmp_path / "out" / "shard0.jsonl"

    generate_shard(shard, out, fake_server.factory(), settings(concurrency=1), show_progress=False)

    [row] = read_rows(out)
    user = TOOL_CONVERSATION[1]
    expected = [SYSTEM, user, CALL, RESULT, {"role": "assistant", "content": "echo:Weather in Paris?"},
                {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "echo:Thanks"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "echo:Bye"}]
    assert row["messages"] == expected  # the empty answer regenerated, the ending user turn answered
    # each request: the conversation so far in the OpenAI format, the tool call and its output as given
    assert [b["messages"] for b in fake_server.requests] == [expected[:4], expected[:6], expected[:8]]
    assert not fake_server.requests_containing("ORIG")
    assert row["generation"]["turns"] == 3


def test_regenerate_last_rewrites_only_the_final_answer_and_keeps_the_earlier_ones(tmp_path, fake_server):
    ends_on_answer = TOOL_CONVERSATION[:-1]
    ends_on_answer[-1] = {"role": "assistant", "content": "ORIG last", "name": "bot"}
    shard = write_shard(tmp_path / "shard0.jsonl", [{"id": "a", "messages": ends_on_answer},
                                                    {"id": "u", "messages": TOOL_CONVERSATION}])
    out = tmp_path / "out" / "shard0.jsonl"

    generate_shard(shard, out, fake_server.factory(), settings(regenerate="last"), show_progress=False)

    a, u = read_rows(out)
    assert a["messages"] == [*ends_on_answer[:-1], {"role": "assistant", "content": "echo:Thanks", "name": "bot"}]
    assert u["messages"] == [*TOOL_CONVERSATION, {"role": "assistant", "content": "echo:Bye"}]
    assert sorted(len(b["messages"]) for b in fake_server.requests) == [6, 8]  # one request each
    assert a["generation"]["turns"] == u["generation"]["turns"] == 1


def test_drop_leaves_out_conversations_ending_on_a_user_turn_and_counts_them(tmp_path, fake_server):
    records = [{"id": "u", "messages": TOOL_CONVERSATION},
               {"id": "t", "messages": TOOL_CONVERSATION[:4]},  # ends on a tool's output: awaits a reply too
               {"id": "c", "messages": TOOL_CONVERSATION[:3]},  # ends on a tool call: nothing awaits a reply
               {"id": "a", "messages": conv("q", "a")}]
    shard = write_shard(tmp_path / "shard0.jsonl", records)
    out = tmp_path / "out" / "shard0.jsonl"

    counts = generate_shard(shard, out, fake_server.factory(), settings(ending_user_turn="drop"),
                            show_progress=False)

    rows = read_rows(out)
    assert [r["id"] for r in rows] == ["u", "t", "c", "a"]
    assert [r["messages"] for r in rows[:2]] == [None, None]
    assert "ends on a user turn (pseudo_labels.ending_user_turn: drop)" in rows[0]["dropped"]
    assert "ends on a tool turn" in rows[1]["dropped"]
    assert rows[2]["messages"] == TOOL_CONVERSATION[:3] and rows[2]["generation"]["turns"] == 0
    assert rows[3]["messages"] == conv("q", "echo:q")
    assert counts["dropped"] == 2 and counts["generated"] == 2 and counts["failed"] == 0
    assert not fake_server.requests_containing("Bye")
    # a shard whose every record is dropped needs no server
    write_shard(shard, records[:2])
    assert generate_shard(shard, out, refuse_server(), settings(ending_user_turn="drop"),
                          show_progress=False)["dropped"] == 2


def test_merge_counts_dropped_records_apart_from_failed_ones(tmp_path, fake_server):
    from modelmake.chat import read_conversations
    from modelmake.pseudo_labels.merge import merge_shards

    shard = write_shard(tmp_path / "shard0.jsonl", [{"id": "u", "messages": TOOL_CONVERSATION},
                                                    {"id": "a", "messages": TOOL_CONVERSATION[:5]}])
    out = tmp_path / "out" / "shard0.jsonl"
    generate_shard(shard, out, fake_server.factory(), settings(ending_user_turn="drop"), show_progress=False)

    stats = merge_shards([out], tmp_path / "labels.parquet", tmp_path / "stats.json", tmp_path / "lengths.png",
                         config={})

    assert (stats["records"], stats["ok"], stats["dropped"], stats["failed"]) == (2, 1, 1, 0)
    assert read_conversations(tmp_path / "labels.parquet") == [
        ("a", [*TOOL_CONVERSATION[:4], {"role": "assistant", "content": "echo:Weather in Paris?"}])]


def test_a_changed_tool_call_is_not_reused_from_the_journal_and_plain_digests_are_unchanged():
    import hashlib

    plain = conv("q", "a", "q2")
    old_digest = hashlib.sha256(json.dumps([["user", "q"], ["user", "q2"]]).encode()).hexdigest()[:16]
    assert input_digest(plain) == old_digest  # journals written before tool turns stay reusable
    edited = json.loads(json.dumps(TOOL_CONVERSATION))
    edited[2]["tool_calls"][0]["function"]["arguments"] = '{"city": "Lyon"}'
    assert input_digest(edited) != input_digest(TOOL_CONVERSATION)
    answer_edited = [*TOOL_CONVERSATION[:4], {"role": "assistant", "content": "other"}, *TOOL_CONVERSATION[5:]]
    assert input_digest(answer_edited) == input_digest(TOOL_CONVERSATION)  # regenerated anyway
    assert input_digest(answer_edited, "last") != input_digest(TOOL_CONVERSATION, "last")  # kept as context


def test_max_conversation_tokens_cuts_back_to_the_last_answer_past_tool_turns(tmp_path, fake_server):
    fake_server.usage = lambda body, answer: (100 * len(body["messages"]), 50)
    shard = write_shard(tmp_path / "shard0.jsonl", [{"id": "t", "messages": [
        *conv("u1", "a1"), {"role": "user", "content": "u2"}, CALL, RESULT, {"role": "assistant", "content": "a2"}]}])
    out = tmp_path / "out" / "shard0.jsonl"

    generate_shard(shard, out, fake_server.factory(), settings(max_conversation_tokens=150), show_progress=False)

    [row] = read_rows(out)
    assert row["messages"] == conv("u1", "echo:u1")  # the user turn and tool turns after it dropped too
    assert row["generation"]["truncated"] is True and len(fake_server.requests) == 1


# ---------------------------------------------------------------- max_conversation_tokens


def test_max_conversation_tokens_stops_further_turns_and_sets_truncated(tmp_path, fake_server):
    # every request: 100 prompt tokens per message in it, 50 completion tokens
    fake_server.usage = lambda body, answer: (100 * len(body["messages"]), 50)
    record = {"id": "long", "messages": conv("u1", "a1", "u2", "a2", "u3", "a3", "u4", "a4")}
    shard = write_shard(tmp_path / "shard0.jsonl", [record])
    out = tmp_path / "out" / "shard0.jsonl"

    # conversation length after turn 1: 100+50=150, after 2: 300+50=350 (50 left), after 3: 550 > 400
    generate_shard(shard, out, fake_server.factory(), settings(max_conversation_tokens=400),
                   show_progress=False)

    [row] = read_rows(out)
    assert row["messages"] == conv("u1", "echo:u1", "u2", "echo:u2", "u3", "echo:u3")
    assert row["generation"]["truncated"] is True
    assert row["generation"]["turns"] == 3
    # the last answer gets only the budget left
    assert [b["max_tokens"] for b in fake_server.requests] == [64, 64, 50]
    assert not fake_server.requests_containing("u4")


def test_a_conversation_within_max_conversation_tokens_is_not_truncated(tmp_path, fake_server):
    fake_server.usage = lambda body, answer: (100 * len(body["messages"]), 50)
    record = {"id": "long", "messages": conv("u1", "a1", "u2", "a2", "u3", "a3", "u4", "a4")}
    shard = write_shard(tmp_path / "shard0.jsonl", [record])
    out = tmp_path / "out" / "shard0.jsonl"

    generate_shard(shard, out, fake_server.factory(), settings(max_conversation_tokens=10_000),
                   show_progress=False)

    [row] = read_rows(out)
    assert row["messages"] == conv("u1", "echo:u1", "u2", "echo:u2", "u3", "echo:u3", "u4", "echo:u4")
    assert row["generation"]["truncated"] is False and row["generation"]["turns"] == 4


# ---------------------------------------------------------------- retries and per-record isolation


def test_503s_are_retried_and_the_shard_completes_when_retries_suffice(tmp_path, fake_server):
    fake_server.fail_first = 3
    ids = ["a", "b"]
    shard = simple_shard(tmp_path, ids)
    out = tmp_path / "out" / "shard0.jsonl"

    counts = generate_shard(shard, out, fake_server.factory(), settings(retries=3, concurrency=1),
                            show_progress=False)

    assert counts["failed"] == 0 and counts["generated"] == 2
    assert fake_server.statuses == [503, 503, 503, 200, 200]
    assert [r["messages"][-1]["content"] for r in read_rows(out)] == ["echo:question a", "echo:question b"]


def test_a_record_fails_after_its_retries_are_exhausted(tmp_path, fake_server):
    fake_server.fail_first = 3
    shard = simple_shard(tmp_path, ["a"])
    out = tmp_path / "out" / "shard0.jsonl"

    with pytest.raises(GenerationError, match="gave up after 3 attempts; last error: HTTP 503"):
        generate_shard(shard, out, fake_server.factory(), settings(retries=2), show_progress=False)
    assert fake_server.statuses == [503, 503, 503]


def test_a_400_is_not_retried_and_fails_only_its_record(tmp_path, fake_server):
    fake_server.bad_marker = "POISON"
    records = [{"id": i, "messages": conv(f"question {i}", "x")} for i in ["a", "b", "c", "d"]]
    records[1]["messages"][0]["content"] = "POISON question b"
    shard = write_shard(tmp_path / "shard0.jsonl", records)
    out = tmp_path / "out" / "shard0.jsonl"

    counts = generate_shard(shard, out, fake_server.factory(), settings(retries=5, max_failure_share=0.25),
                            show_progress=False)

    assert len(fake_server.requests_containing("POISON")) == 1  # no retry of a 400
    assert counts["failed"] == 1 and counts["generated"] == 3
    rows = {r["id"]: r for r in read_rows(out)}
    assert list(rows) == ["a", "b", "c", "d"]
    assert rows["b"]["messages"] is None and "HTTP 400" in rows["b"]["error"]
    for rid in ["a", "c", "d"]:
        assert "error" not in rows[rid]
        assert rows[rid]["messages"][-1] == {"role": "assistant", "content": f"echo:question {rid}"}


def test_connection_errors_are_retried_then_reported(tmp_path, monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as sock:  # a loopback port that nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    shard = simple_shard(tmp_path, ["a"])

    with pytest.raises(GenerationError, match="gave up after 2 attempts; last error: ConnectError"):
        generate_shard(shard, tmp_path / "out" / "shard0.jsonl", lambda: contextlib.nullcontext(url),
                       settings(retries=1), show_progress=False)


# ---------------------------------------------------------------- max_failure_share


def test_too_many_failures_raise_generation_error_keep_successes_in_the_journal_and_write_no_output(
        tmp_path, fake_server):
    fake_server.bad_marker = "POISON"
    ids = ["a", "b", "c", "d"]
    records = [{"id": i, "messages": conv(("POISON " if i in "bd" else "") + f"question {i}", "x")}
               for i in ids]
    shard = write_shard(tmp_path / "shard0.jsonl", records)
    out = tmp_path / "out" / "shard0.jsonl"
    s = settings(max_failure_share=0.25)

    with pytest.raises(GenerationError) as err:
        generate_shard(shard, out, fake_server.factory(), s, show_progress=False)

    assert isinstance(err.value, UserError)
    message = str(err.value)
    assert "2 of 4 records" in message and "HTTP 400" in message
    assert str(journal_path(out)) in message
    assert not out.exists()
    journal = read_rows(journal_path(out))
    assert sorted(r["id"] for r in journal if "error" not in r) == ["a", "c"]
    assert sorted(r["id"] for r in journal if "error" in r) == ["b", "d"]

    # a rerun against a healthy server requests only the failed records
    fake_server.bad_marker = None
    fake_server.requests.clear()
    counts = generate_shard(shard, out, fake_server.factory(), s, show_progress=False)
    assert sorted(b["messages"][0]["content"] for b in fake_server.requests) == \
        ["POISON question b", "POISON question d"]
    assert counts["reused"] == 2 and counts["generated"] == 2 and counts["failed"] == 0
    assert [r["id"] for r in read_rows(out)] == ids


def failure_share_error(tmp_path: Path, fake_server, s: GenerateSettings) -> str:
    fake_server.bad_marker = "POISON"
    shard = write_shard(tmp_path / "prompts.jsonl", [{"id": "a", "messages": conv("POISON question a")}])
    with pytest.raises(GenerationError) as err:
        generate_shard(shard, tmp_path / "out.jsonl", fake_server.factory(), s, show_progress=False)
    return str(err.value)


def test_a_failure_share_error_names_the_callers_config_key(tmp_path, fake_server):
    message = failure_share_error(tmp_path, fake_server, settings(config_key="arena.response_pairs"))
    assert "more than arena.response_pairs.max_failure_share=0.0" in message
    assert "raise arena.response_pairs.max_failure_share" in message
    assert "pseudo_labels" not in message


def test_settings_json_without_config_key_name_no_callers_section(tmp_path, fake_server):
    # a rule command line from before config_key: it still works, and names no pipeline's section
    s = GenerateSettings.from_dict("teacher", {"sampling": {"max_tokens": 8}, "max_failure_share": 0.0})
    assert s.config_key is None
    message = failure_share_error(tmp_path, fake_server, s)
    assert "raise the generation settings' max_failure_share" in message
    assert "pseudo_labels" not in message


def test_settings_json_of_a_rule_becomes_the_settings(tmp_path):
    opts = {"sampling": {"temperature": 0.7, "max_tokens": 8, "seed": 1}, "config_key": "selfplay",
            "teacher_source": {"asset": "tiny-llama"}, "concurrency": 2}
    s = GenerateSettings.from_dict("student", opts)
    assert (s.model, s.config_key, s.sampling, s.concurrency) == (
        "student", "selfplay", Sampling(temperature=0.7, max_tokens=8, seed=1), 2)
    assert opts["sampling"] == {"temperature": 0.7, "max_tokens": 8, "seed": 1}  # the caller's dict untouched
    assert s.key("max_failure_share") == "selfplay.max_failure_share"


# ---------------------------------------------------------------- resume from the journal


def test_resume_requests_only_missing_ids_and_writes_each_id_once_in_shard_order(tmp_path, fake_server):
    ids = ["a", "b", "c", "d", "e"]
    shard = simple_shard(tmp_path, ids)
    out = tmp_path / "out" / "shard0.jsonl"
    s = settings()
    fp = s.fingerprint()

    def done(rid: str, fingerprint: str = fp) -> dict:
        return {"id": rid, "messages": conv(f"question {rid}", f"from journal {rid}"),
                "generation": {"model": "teacher", "fingerprint": fingerprint,
                               "input": input_digest(conv(f"question {rid}", f"original answer {rid}")),
                               "usage": {"prompt_tokens": 2, "completion_tokens": 7}}}

    torn = dumps(done("e"))[:40]  # a kill while writing e
    lines = [dumps(done("a")), dumps(done("b", fingerprint="0" * 16)),  # other settings
             dumps(done("zz")),  # not in this shard
             dumps({"id": "c", "messages": None, "error": "HTTP 400", "generation": {"fingerprint": fp}}),
             dumps(done("d")), torn]
    jpath = journal_path(out)
    jpath.parent.mkdir(parents=True)
    jpath.write_text("\n".join(lines), encoding="utf-8")  # no newline after the torn line

    counts = generate_shard(shard, out, fake_server.factory(), s, show_progress=False)

    requested = sorted(b["messages"][0]["content"] for b in fake_server.requests)
    assert requested == ["question b", "question c", "question e"]
    rows = read_rows(out)
    assert [r["id"] for r in rows] == ids
    answers = {r["id"]: r["messages"][-1]["content"] for r in rows}
    assert answers == {"a": "from journal a", "b": "echo:question b", "c": "echo:question c",
                       "d": "from journal d", "e": "echo:question e"}
    assert counts["reused"] == 2 and counts["generated"] == 3 and counts["failed"] == 0
    assert counts["completion_tokens"] == 7 + 7 + 3 * 2  # reused usage, plus 2 words per echo
    # the journal is compacted: every line parses, each id once, nothing foreign
    journal = read_rows(jpath)
    assert sorted(r["id"] for r in journal) == ids


def test_a_shard_entirely_in_the_journal_needs_no_server(tmp_path, fake_server):
    ids = ["a", "b", "c"]
    shard = simple_shard(tmp_path, ids)
    out = tmp_path / "out" / "shard0.jsonl"
    generate_shard(shard, out, fake_server.factory(), settings(), show_progress=False)
    first = out.read_text(encoding="utf-8")
    out.unlink()  # as Snakemake does with the outputs of a failed group job

    counts = generate_shard(shard, out, refuse_server(), settings(concurrency=1, retries=9),
                            show_progress=False)

    assert counts["reused"] == 3 and counts["generated"] == 0 and counts["failed"] == 0
    assert out.read_text(encoding="utf-8") == first
    assert len(fake_server.requests) == 3


def test_a_record_whose_input_changed_is_not_reused_from_the_journal(tmp_path, fake_server):
    shard = simple_shard(tmp_path, ["a", "b"])
    out = tmp_path / "out" / "shard0.jsonl"
    generate_shard(shard, out, fake_server.factory(), settings(), show_progress=False)
    # b's question changes under the same id: the journal must not hand back the old answer;
    # a's original assistant turn changes, which generation ignores: a is still reused
    write_shard(shard, [{"id": "a", "messages": conv("question a", "x")},
                        {"id": "b", "messages": conv("an edited question b", "x")}])
    fake_server.requests.clear()

    counts = generate_shard(shard, out, fake_server.factory(), settings(), show_progress=False)

    assert [b["messages"][0]["content"] for b in fake_server.requests] == ["an edited question b"]
    assert counts["reused"] == 1 and counts["generated"] == 1
    assert read_rows(out)[1]["messages"] == conv("an edited question b", "echo:an edited question b")


def test_changed_sampling_settings_regenerate_everything(tmp_path, fake_server):
    shard = simple_shard(tmp_path, ["a", "b"])
    out = tmp_path / "out" / "shard0.jsonl"
    generate_shard(shard, out, fake_server.factory(), settings(), show_progress=False)
    fake_server.requests.clear()

    counts = generate_shard(shard, out, fake_server.factory(),
                            settings(sampling=Sampling(temperature=0.0, max_tokens=64, seed=3)),
                            show_progress=False)

    assert counts["reused"] == 0 and counts["generated"] == 2
    assert len(fake_server.requests) == 2


def torn_journal(tmp_path: Path, ids: list[str], tail: bytes) -> tuple[Path, Path, Path]:
    """A shard of ``ids`` (questions in Chinese), its journal holding every id but the last fully,
    then ``tail``."""
    shard = write_shard(tmp_path / "shard0.jsonl",
                        [{"id": i, "messages": conv(f"问题 {i}", f"回答 {i}")} for i in ids])
    out = tmp_path / "out" / "shard0.jsonl"
    s = settings()
    rows = [{"id": i, "messages": conv(f"问题 {i}", f"来自日志 {i}"),
             "generation": {"model": "teacher", "fingerprint": s.fingerprint(),
                            "input": input_digest(conv(f"问题 {i}", f"回答 {i}")), "usage": {}}} for i in ids]
    jpath = journal_path(out)
    jpath.parent.mkdir(parents=True)
    jpath.write_bytes(b"".join((dumps(r) + "\n").encode() for r in rows[:-1]) + tail)
    return shard, out, jpath


def test_a_journal_torn_inside_a_multibyte_character_is_dropped_and_regenerated(tmp_path, fake_server):
    """Disk full or a node crash in the middle of 日 (3 bytes in UTF-8): the last line ends in its
    first byte. A rerun drops that line, whatever its bytes, and regenerates only that record."""
    last = dumps({"id": "c", "messages": conv("问题 c", "来自日志 c")}).encode()
    cut = last.index("日".encode()) + 1
    shard, out, jpath = torn_journal(tmp_path, ["a", "b", "c"], last[:cut])
    with pytest.raises(UnicodeDecodeError):
        last[:cut].decode()

    counts = generate_shard(shard, out, fake_server.factory(), settings(), show_progress=False)

    assert counts["reused"] == 2 and counts["generated"] == 1
    assert [b["messages"][0]["content"] for b in fake_server.requests] == ["问题 c"]
    assert [r["messages"][-1]["content"] for r in read_rows(out)] == ["来自日志 a", "来自日志 b", "echo:问题 c"]


def test_a_damaged_line_before_the_last_is_an_error_naming_the_journal_line(tmp_path):
    shard, out, jpath = torn_journal(tmp_path, ["a", "b", "c"], b"")
    lines = jpath.read_bytes().splitlines(keepends=True)
    jpath.write_bytes(lines[0][:30] + b"\xe6\n" + lines[1])  # line 1 cut mid-character, then line 2
    with pytest.raises(GenerationError, match=f"damaged journal line {jpath}:1 .*Delete that line"):
        generate_shard(shard, out, refuse_server(), settings(), show_progress=False)


def test_duplicate_ids_in_a_generation_input_are_refused_with_file_and_line(tmp_path):
    shard = write_shard(tmp_path / "shard0.jsonl", [{"id": i, "messages": conv(f"q {i}")} for i in ("a", "b", "a")])
    with pytest.raises(RecordError, match=f"duplicate id 'a' in {shard}:3 \\(first at line 1\\)"):
        generate_shard(shard, tmp_path / "out.jsonl", refuse_server(), settings(), show_progress=False)


def test_the_client_sends_the_pools_key_and_ignores_proxy_settings(tmp_path, fake_server, monkeypatch):
    """A login node's proxy variables, pointing at a proxy that is down, must not touch pool traffic."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    shard = simple_shard(tmp_path, ["a", "b"])
    pool = {"url": fake_server.url, "api_key": "k3y", "model": "teacher"}  # a proxy.ready record

    counts = generate_shard(shard, tmp_path / "out.jsonl", lambda: contextlib.nullcontext(pool),
                            settings(retries=0), show_progress=False)

    assert counts["generated"] == 2 and counts["failed"] == 0
    assert fake_server.authorizations == ["Bearer k3y", "Bearer k3y"]


def test_the_progress_bar_keeps_its_failure_count_in_constant_time_per_record(tmp_path, monkeypatch):
    """The bar's failure count is kept as records finish; recounting every result so far at each
    record made a shard quadratic. Rows count how often anyone asks them whether they failed."""
    from modelmake import generate

    asked = [0]

    class Row(dict):
        def __contains__(self, key):
            asked[0] += 1
            return super().__contains__(key)

    async def instant(records, url, s, journal, progress=None, api_key=None):  # a server that fails at once
        for r in records:
            progress(Row(id=r["id"], messages=None, error="HTTP 400", generation={}))
        return 0, len(records)

    monkeypatch.setattr(generate, "generate_records", instant)
    n = 300
    shard = write_shard(tmp_path / "shard0.jsonl", [{"id": str(i), "messages": conv(f"q {i}")} for i in range(n)])
    counts = generate_shard(shard, tmp_path / "out.jsonl", lambda: contextlib.nullcontext("http://unused"),
                            settings(max_failure_share=1.0), show_progress=False)
    assert counts["failed"] == n
    assert asked[0] <= 4 * n  # a few questions per record; the recount asked n * (n + 1) / 2 of them


def test_extra_body_fields_reach_every_request(tmp_path, fake_server):
    """The router judge's structured-output constraint travels in the request body (vLLM reads it there)."""
    extra = {"structured_outputs": {"choice": ["Rating: [[1]]", "Rating: [[2]]"]}}
    shard = write_shard(tmp_path / "shard.jsonl", [{"id": "a", "messages": conv("q1", "a1", "q2")}])
    generate_shard(shard, tmp_path / "out.jsonl", fake_server.factory(), settings(extra_body=extra),
                   show_progress=False)
    assert len(fake_server.requests) == 2
    assert all(r["structured_outputs"] == extra["structured_outputs"] and r["model"] == "teacher"
               for r in fake_server.requests)


# ---------------------------------------------------------------- seeds and fingerprints


def test_request_seed_is_deterministic_and_differs_by_seed_id_and_turn():
    assert request_seed(0, "a", 0) == request_seed(0, "a", 0)
    seeds = {request_seed(seed, rid, turn)
             for seed in (0, 1) for rid in ("a", "b", "ab") for turn in range(3)}
    assert len(seeds) == 2 * 3 * 3
    assert all(0 <= x < 2**31 for x in seeds)


def test_fingerprint_follows_what_is_generated_not_how_fast():
    base = settings()
    fp = base.fingerprint()
    assert settings().fingerprint() == fp
    changed = [
        settings(sampling=Sampling(temperature=0.0, top_p=0.9, max_tokens=64, seed=3)),
        settings(sampling=Sampling(temperature=0.7, top_p=1.0, max_tokens=64, seed=3)),
        settings(sampling=Sampling(temperature=0.7, top_p=0.9, max_tokens=65, seed=3)),
        settings(sampling=Sampling(temperature=0.7, top_p=0.9, max_tokens=64, seed=4)),
        settings(teacher_source={"asset": "other-model"}),
        settings(teacher_source={"path": "/models/x"}),
        settings(model="other"),
        settings(max_conversation_tokens=1000),
        settings(extra_body={"structured_outputs": {"choice": ["Rating: [[1]]"]}}),
        settings(regenerate="last"),
    ]
    assert all(c.fingerprint() != fp for c in changed)
    same = [settings(concurrency=64), settings(retries=0), settings(backoff_s=3.0),
            settings(request_timeout_s=1.0), settings(max_failure_share=0.5),
            settings(config_key="arena.response_pairs"),
            settings(ending_user_turn="drop")]  # which records are generated, not how
    assert all(c.fingerprint() == fp for c in same)


def test_the_default_fingerprint_is_the_one_journals_had_before_tool_turns():
    """regenerate: assistant (the default) adds nothing to the fingerprint, so journals written before
    the key existed are reused after an upgrade."""
    import hashlib
    from dataclasses import asdict

    s = settings()
    key = {"model": s.model, "teacher": s.teacher_source, "sampling": asdict(s.sampling),
           "max_conversation_tokens": s.max_conversation_tokens}
    assert s.fingerprint() == hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- several shards per job


def write_shards(folder: Path, shards: dict[str, list[str]]) -> list[Path]:
    """Shards named as the keys of ``shards``, each with the conversations of its ids."""
    folder.mkdir(parents=True, exist_ok=True)
    return [write_shard(folder / name, [{"id": i, "messages": conv(f"question {i}", f"original answer {i}")}
                                        for i in ids]) for name, ids in shards.items()]


@pytest.fixture
def counted_lease(monkeypatch, fake_server):
    """modelmake.serve.lease replaced by one that yields the fake server as a pool's proxy record and
    counts how often a job leased it."""
    leases = []

    @contextlib.contextmanager
    def lease(spec, folder, log_dir, *, ready_timeout_s, idle_s):
        leases.append((spec.served_name, str(folder)))
        yield {"url": fake_server.url, "api_key": "k3y", "model": spec.served_name}

    import modelmake.serve

    monkeypatch.setattr(modelmake.serve, "lease", lease)
    return leases


def generate_cli(records: list[Path], out: Path, tmp_path: Path) -> int:
    """``python -m modelmake generate`` as the pseudo-label rule runs it (in this process)."""
    from modelmake.cli import main

    settings_json = {"config_key": "pseudo_labels", "teacher_source": {"path": str(tmp_path / "model")},
                     "sampling": {"temperature": 0.7, "top_p": 0.9, "max_tokens": 64, "seed": 3},
                     "concurrency": 2, "retries": 0, "max_failure_share": 0.0}
    pool = {"spec": {"model": str(tmp_path / "model"), "served_name": "teacher", "servers": 1},
            "folder": str(tmp_path / "serve/teacher/part0"), "logs": str(tmp_path / "logs/serve/teacher/part0"),
            "ready_timeout_s": 5, "idle_timeout_s": 1}
    return main(["generate", *map(str, records), "--out", str(out), "--settings", json.dumps(settings_json),
                 "--pool", json.dumps(pool)])


def test_one_job_writes_several_shards_into_its_folder_through_one_lease_and_reruns_only_what_changed(
        tmp_path, fake_server, counted_lease):
    """pseudo_labels.shards_per_job: a job's shards, each its own file in the job's folder and its own
    journal beside the folder (where a job per shard keeps it), leased once; a rerun after Snakemake
    deleted the folder regenerates only the record whose input changed, and nothing at all (no lease)
    when nothing did."""
    shards = write_shards(tmp_path / "data/part0", {"shard0.jsonl": ["a", "b"], "shard1.jsonl": ["c"],
                                                    "shard2.jsonl": ["d", "e"]})
    group = tmp_path / "labels/part0/group0"

    assert generate_cli(shards, group, tmp_path) == 0

    assert len(counted_lease) == 1 and len(fake_server.requests) == 5
    for shard, ids in zip(shards, (["a", "b"], ["c"], ["d", "e"])):
        out = group / shard.name
        assert [r["id"] for r in read_rows(out)] == ids
        # the journal is in the order answers came back (requests run concurrently), the shard in input order
        assert sorted(r["id"] for r in read_rows(tmp_path / "labels/part0/.journal" / shard.name)) == ids
        provenance = json.loads((group / f"{shard.name}.provenance.json").read_text())
        assert provenance["counts"]["generated"] == len(ids)
    first = {s.name: (group / s.name).read_text() for s in shards}

    # e's question is edited; Snakemake deletes a job's folder output before rerunning it
    write_shards(tmp_path / "data/part0", {"shard2.jsonl": ["d"]})
    with open(shards[2], "a", encoding="utf-8") as f:
        f.write(dumps({"id": "e", "messages": conv("an edited question e", "x")}) + "\n")
    shutil.rmtree(group)
    fake_server.requests.clear()

    assert generate_cli(shards, group, tmp_path) == 0

    assert [b["messages"][0]["content"] for b in fake_server.requests] == ["an edited question e"]
    assert len(counted_lease) == 2
    assert all((group / s.name).read_text() == first[s.name] for s in shards[:2])
    assert read_rows(group / "shard2.jsonl")[1]["messages"][-1]["content"] == "echo:an edited question e"

    shutil.rmtree(group)
    fake_server.requests.clear()
    assert generate_cli(shards, group, tmp_path) == 0
    assert len(counted_lease) == 2 and not fake_server.requests  # all journalled: no lease, no request


def test_a_job_stops_at_its_first_failing_shard_and_its_rerun_generates_only_what_is_missing(
        tmp_path, fake_server):
    from modelmake.generate import generate_files

    shards = write_shards(tmp_path / "data", {"shard0.jsonl": ["a"], "shard1.jsonl": ["b", "c"],
                                              "shard2.jsonl": ["d"]})
    write_shard(shards[1], [{"id": "b", "messages": conv("question b", "x")},
                            {"id": "c", "messages": conv("question c BAD", "x")}])
    fake_server.bad_marker = "BAD"
    group = tmp_path / "labels/group0"

    with pytest.raises(GenerationError, match=f"1 of 2 records of {shards[1]} failed"):
        generate_files(shards, group, fake_server.factory(), settings(), tmp_path / "model",
                       show_progress=False)

    assert (group / "shard0.jsonl").exists() and not (group / "shard1.jsonl").exists()
    assert not fake_server.requests_containing("question d")  # the job stopped before shard2
    fake_server.bad_marker = None
    fake_server.requests.clear()

    counts = generate_files(shards, group, fake_server.factory(), settings(), tmp_path / "model",
                            show_progress=False)

    requested = sorted(b["messages"][0]["content"] for b in fake_server.requests)
    assert requested == ["question c BAD", "question d"]
    assert [c["reused"] for c in counts] == [1, 1, 0]


def test_several_records_files_want_a_folder_with_distinct_names():
    from modelmake.generate import output_plan

    assert output_plan(["d/shard0.jsonl"], "l/shard0.jsonl") == [
        (Path("d/shard0.jsonl"), Path("l/shard0.jsonl"), Path("l/.journal/shard0.jsonl"))]
    assert output_plan(["d/shard0.jsonl"], "l/group3") == [
        (Path("d/shard0.jsonl"), Path("l/group3/shard0.jsonl"), Path("l/.journal/shard0.jsonl"))]
    with pytest.raises(UserError, match="--out l/x.jsonl is a file, for one records file; 2 were given"):
        output_plan(["d/a.jsonl", "d/b.jsonl"], "l/x.jsonl")
    with pytest.raises(UserError, match="two records files are named a.jsonl"):
        output_plan(["d/a.jsonl", "e/a.jsonl"], "l/group0")
