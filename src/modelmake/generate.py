"""Generation: regenerate the assistant turns of a jsonl file of conversations through the OpenAI
chat endpoint.

Shared by every pipeline that generates (a pseudo-label shard, the arena's prompts, a self-play
fraction); the caller's config section is ``GenerateSettings.config_key``, so that errors name the
setting to change. The one client path of modelmake: async HTTP with bounded concurrency, retries
with exponential backoff on connection errors, 429 and 5xx, and per-record error isolation. The
server applies the model's own chat template (no templates here).

Conversations are in the canonical shape (:mod:`modelmake.chat`). What the teacher writes
(``regenerate``): ``assistant``, every assistant turn that calls no tool, each seeing the teacher's
own earlier answers; ``last``, only the final one, the earlier turns kept as given. Everything else
(system, user, tool outputs, tool-calling assistant turns) is kept as context and sent as it is, in
the OpenAI format (``tool_calls``, ``tool_call_id``, ``name``). A conversation that ends on a user
turn (or a tool's output) awaits a reply: ``ending_user_turn: answer`` generates it, ``drop`` leaves
the record out (a row ``{id, messages: null, dropped}``, counted, nothing requested).

Resume without loss or duplicates: every finished record (success or failure) is appended, with a
fingerprint of the generation settings, to a journal beside the output
(``<out dir>/.journal/<out name>``; for a job of several records files, beside its output folder:
:func:`output_plan`). A rerun reuses the journal's successful records whose id is in
the shard, whose input turns are unchanged and whose fingerprint matches, and generates only the
rest; the output is written atomically at the end, in shard order. Snakemake deletes the outputs
of a failed group job, but not the journal, so even shards finished beside a failed one cost
nothing to rebuild. A kill or a full disk tears at most the journal's last line, at any byte (even
inside a multi-byte character): that line has no newline, and is dropped and regenerated; a
damaged line before it is an error naming the journal's file:line.

The client never uses a proxy of the environment (``http_proxy``, ``ALL_PROXY``, ...: the pool is
on this host) and sends the pool's API key (``proxy.ready``'s ``api_key``) with every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from modelmake.chat import is_tool_call, plain_messages
from modelmake.config import schema_field
from modelmake.errors import GenerationError, RecordError, UserError
from modelmake.files import atomic_open, dumps, read_jsonl

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class Sampling:
    """Per-request sampling (schema $defs/sampling, whose defaults these are)."""

    temperature: float = schema_field("$defs.sampling.temperature")
    top_p: float = schema_field("$defs.sampling.top_p")
    max_tokens: int = schema_field("$defs.sampling.max_tokens")
    seed: int = schema_field("$defs.sampling.seed")
    ignore_eos: bool = schema_field("$defs.sampling.ignore_eos")  # always max_tokens (benchmarks)


@dataclass(frozen=True)
class GenerateSettings:
    model: str  # what the records call the model (the config's role name): in meta and the fingerprint
    sampling: Sampling
    # the caller's config section ("pseudo_labels", "arena.response_pairs", "selfplay"): errors name
    # its keys; None only for settings that predate it (errors then say "the generation settings'")
    config_key: str | None
    teacher_source: dict | None = None  # what identifies the served model's weights (path or asset)
    # schema $defs/generation, whose defaults these are (a section may set its own: selfplay.concurrency)
    max_conversation_tokens: int = schema_field("$defs.generation.max_conversation_tokens")
    concurrency: int = schema_field("$defs.generation.concurrency")
    retries: int = schema_field("$defs.generation.retries")
    backoff_s: float = 0.5
    request_timeout_s: float = 300.0
    max_failure_share: float = schema_field("$defs.generation.max_failure_share")
    # which turns are regenerated, and a conversation that ends on a user turn (pseudo_labels' keys;
    # the arena's and self-play's records end on the one assistant turn they regenerate)
    regenerate: str = schema_field("pseudo_labels.regenerate")
    ending_user_turn: str = schema_field("pseudo_labels.ending_user_turn")
    # more fields of every request's body, e.g. vLLM's structured_outputs (the router's judge); part of
    # the fingerprint when given
    extra_body: dict | None = None
    # the name the pool serves the model under (a pool is shared by every job serving the same model
    # the same way: rules/common.smk generation_pool); None: ``model``
    served_name: str | None = None

    @classmethod
    def from_dict(cls, model: str, opts: dict) -> GenerateSettings:
        """The settings JSON a rule passes (``--settings``: sampling, config_key, ...) for ``model``.

        ``config_key`` is expected; a command line written before it existed still works, and its
        errors then name "the generation settings'" keys instead of a config key.
        """
        opts = dict(opts)
        sampling = Sampling(**opts.pop("sampling"))
        if "config_key" not in opts:
            log.warning("the generation settings carry no config_key: errors cannot name the config section")
        return cls(model=model, sampling=sampling, **{"config_key": None, **opts})

    def key(self, name: str) -> str:
        """How an error names the setting ``name``: ``<config_key>.<name>``, the key the user edits."""
        return f"{self.config_key}.{name}" if self.config_key else f"the generation settings' {name}"

    def fingerprint(self) -> str:
        """What makes a generated record reusable: the model and how it samples."""
        key = {"model": self.model, "teacher": self.teacher_source, "sampling": asdict(self.sampling),
               "max_conversation_tokens": self.max_conversation_tokens}
        if self.regenerate != "assistant":  # absent otherwise: journals from before the key stay reusable
            key["regenerate"] = self.regenerate
        if self.extra_body is not None:  # likewise
            key["extra_body"] = self.extra_body
        # ending_user_turn is not in it: it decides which records are generated, not how
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


class RequestFailed(Exception):
    pass


def journal_path(out: Path) -> Path:
    return out.parent / ".journal" / out.name


def output_plan(records: list[str | Path], out: str | Path) -> list[tuple[Path, Path, Path]]:
    """(records file, output file, journal) of each records file given to ``modelmake generate``.

    ``out`` named ``*.jsonl`` is the output file of the one records file, journaled in
    ``<out dir>/.journal/<out name>``. Any other ``out`` is a folder that receives a file per records
    file, named as it; their journals sit beside the folder, in ``<folder's parent>/.journal/<name>``:
    Snakemake deletes a folder output before its job runs and after it fails, and the journal must
    outlive both. (A pseudo-label group folder ``part{p}/group{g}`` so shares its shards' journals,
    ``part{p}/.journal/shard{s}.jsonl``, with one-shard-per-job runs.)
    """
    records, out = [Path(r) for r in records], Path(out)
    if out.suffix == ".jsonl":
        if len(records) != 1:
            raise UserError(f"--out {out} is a file, for one records file; {len(records)} were given. "
                            f"Give a folder (a name not ending in .jsonl) to write a file per records file")
        return [(records[0], out, journal_path(out))]
    names: dict[str, Path] = {}
    for r in records:
        if r.name in names:
            raise UserError(f"two records files are named {r.name} ({names[r.name]} and {r}): each one's "
                            f"output in the folder {out} is named as it. Rename one, or generate them apart")
        names[r.name] = r
    return [(r, out / r.name, out.parent / ".journal" / r.name) for r in records]


@contextlib.contextmanager
def shared_server(server):
    """A server factory like ``server`` (see generate_shard) that enters it on first use only and keeps
    it until this block ends: the shards of one job share one pool lease, and a job whose every shard
    is journalled starts none."""
    with contextlib.ExitStack() as stack:
        held: list = []

        @contextlib.contextmanager
        def once():
            if not held:
                held.append(stack.enter_context(server()))
            yield held[0]

        yield once


def generate_files(records: list[str | Path], out: str | Path, server, settings: GenerateSettings,
                   model_folder: str | Path, show_progress=True) -> list[dict]:
    """``modelmake generate``: every records file into its output (``output_plan``), one after another
    through one lease of ``server``, each resumed from its own journal and given its provenance; the
    counts of each. The first file that fails (``GenerationError``) stops the job; the files done
    before it are written, and every finished record is journalled."""
    plan = output_plan(records, out)
    if plan[0][1] != Path(out):  # a folder of outputs
        Path(out).mkdir(parents=True, exist_ok=True)
    counts = []
    with shared_server(server) as once:
        for rec, dest, journal in plan:
            started = time.time()
            c = generate_shard(rec, dest, once, settings, show_progress=show_progress, journal=journal)
            write_generation_provenance(dest, rec, model_folder, settings, c, started)
            counts.append(c)
    return counts


def targets(messages: list[dict], regenerate: str = "assistant") -> list[int]:
    """Positions of the assistant turns the teacher rewrites (``regenerate``: see the module
    docstring); an unanswered end is not among them (``ending_user_turn`` decides)."""
    plain = [i for i, m in enumerate(messages) if m["role"] == "assistant" and not is_tool_call(m)]
    if regenerate == "assistant":
        return plain
    if regenerate == "last":
        return plain[-1:] if plain and plain[-1] == len(messages) - 1 else []
    raise ValueError(f"regenerate must be 'assistant' or 'last', got {regenerate!r}")


def awaits_reply(messages: list[dict]) -> bool:
    """Whether a conversation ends on a user turn or a tool's output (its reply is missing)."""
    return bool(messages) and messages[-1]["role"] in ("user", "tool")


def input_digest(messages: list[dict], regenerate: str = "assistant") -> str:
    """What a journal record was generated from (the turns answer_turns sends as they are), so that
    a record edited under the same id is not reused."""
    skip = set(targets(messages, regenerate))
    used = []
    for i, m in enumerate(plain_messages(messages)):
        if i in skip:
            continue
        extra = {k: v for k, v in m.items() if k not in ("role", "content")}
        used.append([m["role"], m["content"], extra] if extra else [m["role"], m["content"]])
    return hashlib.sha256(json.dumps(used, ensure_ascii=False).encode()).hexdigest()[:16]


def load_journal(path: Path, wanted: dict[str, str], fingerprint: str) -> dict[str, dict]:
    """Successful records of earlier runs that can be reused.

    ``wanted`` maps the shard's ids to the input_digest of their messages. A last line without its
    newline was torn by a kill or a full disk, whatever its bytes: it is dropped (and regenerated).
    Any other line that is not a JSON object raises :class:`GenerationError` naming file:line.
    """
    done: dict[str, dict] = {}
    if not path.exists():
        return done
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                log.warning("%s:%d: dropped the torn last line (%d bytes, no newline); it is regenerated",
                            path, n, len(raw))
                break
            try:
                rec = json.loads(raw.decode("utf-8"))
                if not isinstance(rec, dict):
                    raise ValueError(f"a JSON {type(rec).__name__}, not an object")
            except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                raise GenerationError(
                    f"damaged journal line {path}:{n} ({e}); only a last line can be torn by a kill. "
                    f"Delete that line (its record is regenerated) or the whole journal (every record is) "
                    f"and run again") from None
            meta = rec.get("generation", {})
            if (rec.get("id") in wanted and "error" not in rec and meta.get("fingerprint") == fingerprint
                    and meta.get("input") == wanted[rec["id"]]):
                done[rec["id"]] = rec
    return done


def request_seed(seed: int, rid: str, turn: int) -> int:
    """A per-request seed, so sampled answers do not depend on request order or concurrency."""
    h = hashlib.sha256(f"{seed}:{rid}:{turn}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


async def chat(client, url: str, body: dict, s: GenerateSettings) -> dict:
    import httpx

    for attempt in range(s.retries + 1):
        try:
            r = await client.post(url, json=body, timeout=s.request_timeout_s)
            if r.status_code == 200:
                return r.json()
            err = f"HTTP {r.status_code}: {r.text[:300]}"
            if r.status_code not in RETRY_STATUS:
                raise RequestFailed(err)
        except httpx.TransportError as e:
            err = f"{type(e).__name__}: {e}"
        if attempt < s.retries:
            await asyncio.sleep(s.backoff_s * 2**attempt * (1 + random.random()))
    raise RequestFailed(f"gave up after {s.retries + 1} attempts; last error: {err}")


async def answer_turns(client, url: str, rec: dict, s: GenerateSettings) -> dict:
    """Regenerate one conversation's assistant turns with the served model, turn by turn.

    The turns of ``targets`` are replaced by the model's answers, each request holding the
    conversation up to that turn (with the model's own earlier answers); the other turns are sent
    as they are. A conversation awaiting a reply gets one at the end. Generation stops when the
    conversation reaches ``max_conversation_tokens`` (prompt plus answers); it then ends after the
    last answer generated, the turns after that point dropped.
    """
    messages = plain_messages(rec["messages"])
    regen = set(targets(messages, s.regenerate))
    steps = list(enumerate(messages))
    if awaits_reply(messages):
        steps.append((len(messages), {"role": "assistant", "content": ""}))  # the reply it awaits
        regen.add(len(messages))
    history: list[dict] = []
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    finish: list[str] = []
    answered = 0  # len(history) after the last generated answer
    length, truncated = 0, False  # tokens in the conversation so far, as the server counted them
    for i, m in steps:
        if i not in regen:
            history.append(m)
            continue
        budget = s.max_conversation_tokens - length
        if budget <= 0:
            del history[answered:]
            truncated = True
            break
        body = {
            "model": s.served_name or s.model, "messages": history,
            "temperature": s.sampling.temperature, "top_p": s.sampling.top_p,
            "max_tokens": min(s.sampling.max_tokens, budget),
            "seed": request_seed(s.sampling.seed, rec["id"], len(finish)),
        }
        if s.sampling.ignore_eos:
            body["ignore_eos"] = True  # a vLLM extension of the OpenAI API
        if s.extra_body:
            body.update(s.extra_body)
        out = await chat(client, url, body, s)
        choice = out["choices"][0]
        answer = {"role": "assistant", "content": choice["message"]["content"] or ""}
        if "name" in m:
            answer["name"] = m["name"]
        history.append(answer)
        answered = len(history)
        usage["prompt_tokens"] += out["usage"]["prompt_tokens"]
        usage["completion_tokens"] += out["usage"]["completion_tokens"]
        length = out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]
        finish.append(choice["finish_reason"])
    return {"messages": history, "usage": usage, "finish_reasons": finish,
            "turns": len(finish), "truncated": truncated}


async def generate_records(
    records: list[dict], base_url: str, s: GenerateSettings, journal, progress=None,
    api_key: str | None = None,
) -> tuple[int, int]:
    """Generate every record, appending each result to ``journal`` as it finishes. ``api_key``: the
    pool's (sent as a bearer token). No proxy of the environment is used."""
    import httpx

    fingerprint = s.fingerprint()
    sem = asyncio.Semaphore(s.concurrency)
    url = base_url.rstrip("/") + "/v1/chat/completions"
    ok = failed = 0
    limits = httpx.Limits(max_connections=s.concurrency, max_keepalive_connections=s.concurrency)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(limits=limits, headers=headers, trust_env=False) as client:

        async def one(rec: dict) -> None:
            nonlocal ok, failed
            async with sem:
                started = time.time()
                meta = {"model": s.model, "fingerprint": fingerprint,
                        "input": input_digest(rec["messages"], s.regenerate),
                        "sampling": asdict(s.sampling)}
                try:
                    res = await answer_turns(client, url, rec, s)
                    row = {"id": rec["id"], "messages": res.pop("messages"),
                           "generation": {**meta, **res, "seconds": round(time.time() - started, 3)}}
                    ok += 1
                except (RequestFailed, KeyError, IndexError, TypeError, ValueError) as e:
                    row = {"id": rec["id"], "messages": None, "error": str(e),
                           "generation": {**meta, "seconds": round(time.time() - started, 3)}}
                    failed += 1
                journal.write(dumps(row) + "\n")
                journal.flush()
                if progress is not None:
                    progress(row)

        await asyncio.gather(*(one(r) for r in records))
    return ok, failed


def generate_shard(
    shard: str | Path, out: str | Path, server, settings: GenerateSettings, show_progress=True,
    journal: str | Path | None = None,
) -> dict:
    """Generate one jsonl file of conversations (a shard) into ``out`` (jsonl), resuming from its
    journal (``journal``; default ``journal_path(out)``); return the counts.

    ``server`` is a context manager factory yielding the server's base URL, or the pool's proxy
    record (``url`` and ``api_key``); it is entered only when something is left to generate (a
    shard fully in its journal, or dropped, needs no server). An id twice in the shard is refused
    (file:line): their answers would collapse into one.
    """
    from tqdm import tqdm

    if settings.ending_user_turn not in ("answer", "drop"):
        raise ValueError(f"ending_user_turn must be 'answer' or 'drop', got {settings.ending_user_turn!r}")
    started = time.time()
    shard, out = Path(shard), Path(out)
    records = read_jsonl(shard)
    order = [r["id"] for r in records]
    first: dict[str, int] = {}
    for n, rid in enumerate(order, start=1):
        if rid in first:
            raise RecordError(f"duplicate id {rid!r} in {shard}:{n} (first at line {first[rid]}): every "
                              f"record of a generation input needs its own id; fix the input it was made from")
        first[rid] = n
    dropped = {}
    if settings.ending_user_turn == "drop":
        reason = f"the conversation ends on a {{role}} turn ({settings.key('ending_user_turn')}: drop)"
        dropped = {r["id"]: {"id": r["id"], "messages": None,
                             "dropped": reason.format(role=r["messages"][-1]["role"])}
                   for r in records if awaits_reply(r["messages"])}
        records = [r for r in records if r["id"] not in dropped]
    jpath = Path(journal) if journal is not None else journal_path(out)
    jpath.parent.mkdir(parents=True, exist_ok=True)
    fp = settings.fingerprint()
    done = load_journal(jpath, {r["id"]: input_digest(r["messages"], settings.regenerate) for r in records}, fp)
    todo = [r for r in records if r["id"] not in done]
    log.info("%s: %d records, %d dropped, %d reused from the journal, %d to generate",
             shard, len(order), len(dropped), len(done), len(todo))

    # Compact the journal to the reusable records, then append new ones.
    with atomic_open(jpath) as f:
        for rid in order:
            if rid in done:
                f.write(dumps(done[rid]) + "\n")
    bar = tqdm(total=len(records), initial=len(done), desc=f"generate {shard.name}", unit="rec",
               mininterval=2.0, disable=not show_progress)
    tokens, failures = [0], [0]  # the journal's reused records are successes
    results: dict[str, dict] = dict(done)

    def progress(row: dict) -> None:
        results[row["id"]] = row
        tokens[0] += row["generation"].get("usage", {}).get("completion_tokens", 0)
        failures[0] += "error" in row
        bar.update(1)
        bar.set_postfix(tok_s=f"{tokens[0] / max(1e-9, time.time() - started):.0f}", failed=failures[0])

    ok = 0
    if todo:
        with server() as where, open(jpath, "a", encoding="utf-8") as appended:
            base_url, key = (where["url"], where.get("api_key")) if isinstance(where, dict) else (where, None)
            ok, _ = asyncio.run(generate_records(todo, base_url, settings, appended, progress, api_key=key))
    bar.close()

    total_failed = sum("error" in r for r in results.values())
    counts = {
        "records": len(order), "dropped": len(dropped), "reused": len(done), "generated": ok,
        "failed": total_failed,
        "completion_tokens": sum(r["generation"].get("usage", {}).get("completion_tokens", 0)
                                 for r in results.values()),
        "seconds": round(time.time() - started, 3),
    }
    if records and total_failed / len(records) > settings.max_failure_share:
        example = next(r["error"] for r in results.values() if "error" in r)
        key = settings.key("max_failure_share")
        raise GenerationError(
            f"{total_failed} of {len(records)} records of {shard} failed to generate "
            f"(more than {key}={settings.max_failure_share}); first error: {example}. "
            f"Check the server logs, or raise {key} to accept more failures; successful records are "
            f"kept in {jpath} and a rerun retries only the failed ones."
        )
    results.update(dropped)
    with atomic_open(out) as f:
        for rid in order:
            f.write(dumps(results[rid]) + "\n")
    log.info("%s: %s", out, counts)
    return counts


def served_model_source(teacher_source: dict | None, model_folder: str | Path) -> dict | None:
    """What identifies the served weights in the journal's fingerprint: ``teacher_source`` (the rule's
    ``model_source``), plus the digest of the folder's ``manifest.json`` when modelmake finished it
    (a model a pipeline builds: a self-play iteration, the router, a ``models.<role>.built``). Such a
    model keeps its reference and path when it is retrained; the digest makes a journaled record
    reusable only for the same weights."""
    from modelmake.files import MANIFEST, content_digest

    if not (Path(model_folder) / MANIFEST).is_file():
        return teacher_source
    return {**(teacher_source or {}), "weights": content_digest(model_folder)}


def write_generation_provenance(out: str | Path, records: str | Path, model_folder: str | Path,
                                settings: GenerateSettings, counts: dict, started: float) -> Path:
    """``<out>.provenance.json`` beside a generated jsonl (files.write_provenance): the settings, the
    records file and the served model folder with their digests, the counts. A model folder given by
    path (``teacher_source`` without ``asset`` or ``built``) and without a manifest is named, not
    hashed: hashing a large model's weights in every generation job costs too much."""
    from modelmake.files import MANIFEST, write_provenance

    source = settings.teacher_source or {}
    hashed = (Path(model_folder) / MANIFEST).is_file() or "asset" in source or "built" in source
    config = {"generation": asdict(settings), "model_folder": str(model_folder),
              **({} if hashed else {"model_not_hashed": "a model folder given by path, without manifest.json"})}
    return write_provenance(out, config=config, inputs=[records, *([model_folder] if hashed else [])],
                            counts=counts, started=started)
