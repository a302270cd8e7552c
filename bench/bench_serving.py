"""Benchmark: the serving path's overhead where modelmake owns it (client and proxy), and pool layouts.

The same prompts (the first user turn of every demo conversation, repeated to --prompts), the same
model, greedy, exactly --max-tokens tokens each (ignore_eos), on this machine in one run:

  offline     vLLM's offline ``LLM.chat`` in one process on every core: the engine alone, no HTTP.
  For each pool layout of --layouts (SxC: S servers of C cores each; the pool started with
  ``modelmake.serve.lease``, as a generation job starts it):
  vllm bench  vLLM's own benchmark client (``vllm.benchmarks.serve``, what ``vllm bench serve`` runs;
              backend openai-chat, custom dataset, chat template left to the server) straight to
              the servers: one client process per server, each with its share of the prompts and
              of --concurrency, released together once all are set up;
  modelmake   modelmake's client (``modelmake.generate.generate_shard``, what every generation job
              runs) through the pool's Traefik proxy: the pipelines' path;
  direct      the same client straight to the servers (one shard per server): the proxy's share.
  Each client runs once per round; the order is reversed every other round, so drift hits all.

Printed per layout: tokens/s of each client (its best round: on a shared machine another process's
burst only ever slows a run down), the ratio modelmake / vllm bench
(issue 17's target >= 0.98: client and proxy cost at most 2%), modelmake / offline, and CPU
seconds per 1,000 generated tokens of the client process (getrusage, the measured stretch only), of
the proxy and of the servers (/proc, their process groups), in that best round, and the client's
and proxy's CPU as a share of the servers' (less sensitive to other processes than tokens/s); then
the layouts side by side.
Start-up (model load, server health, client imports, tokenizer) is excluded everywhere.
vLLM's client streams (one server-sent event per token) and modelmake's does not (one JSON answer
per request): the servers' CPU per 1,000 tokens shows what the protocol costs them.

Usage: python bench/bench_serving.py [--hidden 512 --layers 8] [--layouts 1x2 2x1] [--prompts 400]
       [--concurrency 64] [--max-tokens 64] [--rounds 3] [--model FOLDER] [--smoke]
Without --model, a random-initialised Llama of the given size is saved with the demo tokenizer
(trained from resources/demo in a temporary folder): the demo's tiny teacher is so small that
per-request HTTP cost, not the model, would decide the ratio.
--smoke: a 1-layer Llama of width 64, layout 2x1, 8 prompts of 8 tokens, concurrency 4, 1 round:
every code path in about two minutes (three vLLM start-ups); its numbers are not benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common

REPO = common.REPO
sys.path.insert(0, str(REPO / "src"))
SMOKE = {"hidden": 64, "layers": 1, "layouts": ["2x1"], "prompts": 8, "concurrency": 4, "max_tokens": 8,
         "rounds": 1}
SERVED = "teacher"
CLIENTS = ("vllm bench", "modelmake", "direct")
WHERE = {"vllm bench": "to the servers", "modelmake": "through Traefik", "direct": "to the servers"}


def prompts(n: int) -> list[str]:
    rows = []
    for name in ("chat_en", "chat_zh"):
        for line in (REPO / f"resources/demo/{name}.jsonl").read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            rows.append(r["data"][0] if "data" in r else r["conversations"][0]["value"])
    return [rows[i % len(rows)] for i in range(n)]


def split(items: list, n: int) -> list[list]:
    """``items`` dealt round-robin into n parts (one per server)."""
    return [items[i::n] for i in range(n)]


def offline(args) -> dict:
    """Runs in its own process (see run): vLLM's offline engine on every core."""
    cores = sorted(os.sched_getaffinity(0))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"{cores[0]}-{cores[-1]}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, dtype="float32", max_model_len=512, enforce_eager=True, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    batch = [[{"role": "user", "content": p}] for p in prompts(args.prompts)]
    t = time.perf_counter()
    outs = llm.chat(batch, params, use_tqdm=False)
    dt = time.perf_counter() - t
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"tokens": tokens, "seconds": dt, "tok_s": tokens / dt}


@contextlib.contextmanager
def pool(args, servers: int, cores: int, tmp: Path):
    """A leased pool of ``servers`` vLLM servers of ``cores`` cores each behind Traefik; yields its
    proxy record (url, servers, api_key) and the process groups of its servers and of its proxy.
    On leaving, the pool is stopped: by its supervisor once the lease is gone, else by PID."""
    from modelmake.serve import PoolSpec, lease

    spec = PoolSpec(model=args.model, served_name=SERVED, servers=servers, max_model_len=512, dtype="float32",
                    enforce_eager=True, cpu_threads_per_server=cores)
    folder, st = tmp / f"pool{servers}x{cores}", None
    try:
        with lease(spec, folder, tmp / f"logs{servers}x{cores}", ready_timeout_s=900, idle_s=1) as proxy:
            st = ready_state(folder)
            yield (proxy, {p["pid"] for p in st["procs"] if p["name"].startswith("server")},
                   {p["pid"] for p in st["procs"] if p["name"] == "proxy"})
    finally:
        stop_pool(folder, st)


def ready_state(folder: Path, timeout_s: float = 60) -> dict:
    """The pool's state.json once it says ready (written just after proxy.ready): every process in it."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError, ValueError):
            st = json.loads((folder / "state.json").read_text())
            if st["status"] == "ready" or time.monotonic() > deadline:
                return st
        time.sleep(0.2)


def stop_pool(folder: Path, st: dict | None, timeout_s: float = 60) -> None:
    """Wait for the pool's supervisor to stop it (our lease is gone), then stop by PID, with their
    process groups, the supervisor and whatever it started that is still alive: no server outlives
    the benchmark."""
    from modelmake.serve import stop_leftovers, supervisor_alive

    with contextlib.suppress(OSError, ValueError):
        st = st or json.loads((folder / "state.json").read_text())
    deadline = time.monotonic() + timeout_s
    while supervisor_alive(st) and time.monotonic() < deadline:
        time.sleep(0.5)
    if supervisor_alive(st):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(st["supervisor_pid"], signal.SIGKILL)
    stop_leftovers(st, grace_s=5)


def modelmake_client(urls: list[str], key: str, texts: list[str], args, work: Path) -> dict:
    """generate_shard (the generation jobs' client) over ``texts``: one shard per URL (the pool's API
    ``key`` on every request), run side by side, each with its share of --concurrency; returns tokens,
    wall seconds, this process's CPU seconds."""
    from modelmake.files import dumps
    from modelmake.generate import GenerateSettings, Sampling, generate_shard

    settings = GenerateSettings(
        model=SERVED, sampling=Sampling(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True),
        config_key="pseudo_labels", max_conversation_tokens=512,
        concurrency=max(1, args.concurrency // len(urls)))
    work.mkdir(parents=True)
    shards = []
    for i, part in enumerate(split(list(enumerate(texts)), len(urls))):
        shards.append(work / f"shard{i}.jsonl")
        shards[-1].write_text("".join(dumps({"id": str(n), "messages": [{"role": "user", "content": t}]}) + "\n"
                                      for n, t in part), encoding="utf-8")

    def one(i: int) -> dict:
        where = {"url": urls[i], "api_key": key}  # what a lease yields: the proxy record
        return generate_shard(shards[i], work / f"out{i}.jsonl", lambda: contextlib.nullcontext(where), settings,
                              show_progress=False)

    t, cpu = time.perf_counter(), common.own_cpu_seconds()
    if len(urls) == 1:
        counts = [one(0)]
    else:
        with ThreadPoolExecutor(len(urls)) as ex:
            counts = list(ex.map(one, range(len(urls))))
    dt, cpu = time.perf_counter() - t, common.own_cpu_seconds() - cpu
    return {"tokens": sum(c["completion_tokens"] for c in counts), "seconds": dt, "client_cpu_s": cpu,
            "failed": sum(c["failed"] for c in counts)}


def vllm_clients(urls: list[str], key: str, texts: list[str], args, work: Path, pool_cpu: PoolCpu) -> dict:
    """vLLM's benchmark client, one process per URL with its share of ``texts`` and of --concurrency,
    released together once every one has loaded its tokenizer and data (``pool_cpu`` starts then)."""
    work.mkdir(parents=True)
    procs = []
    for i, part in enumerate(split(texts, len(urls))):
        data = work / f"data{i}.jsonl"
        data.write_text("".join(json.dumps({"prompt": t}, ensure_ascii=False) + "\n" for t in part), encoding="utf-8")
        cmd = [sys.executable, __file__, "--vllm-client", str(i), "--url", urls[i], "--data", str(data),
               "--model", args.model, "--prompts", str(len(part)), "--max-tokens", str(args.max_tokens),
               "--concurrency", str(max(1, args.concurrency // len(urls))), "--sync", str(work)]
        # vLLM's client sends OPENAI_API_KEY as the bearer token
        procs.append(common.start(cmd, env={"OPENAI_API_KEY": key}, log=work / f"client{i}.log"))
    deadline = time.monotonic() + 300
    while len(list(work.glob("ready.*"))) < len(procs):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            break  # result() below names the one that failed
        time.sleep(0.05)
    pool_cpu.start()
    (work / "go").touch()
    rows = [common.result(p, f"vLLM's benchmark client {i}") for i, p in enumerate(procs)]
    return {"tokens": sum(r["tokens"] for r in rows),
            "seconds": max(r["end"] for r in rows) - min(r["start"] for r in rows),
            "client_cpu_s": sum(r["cpu_s"] for r in rows), "failed": sum(r["failed"] for r in rows)}


def vllm_client(a) -> None:
    """One process of vLLM's benchmark client (``vllm bench serve``'s code, through its own argument
    parser): waits for ``go`` in --sync once set up, times and CPU-counts its ``benchmark`` call."""
    import vllm.benchmarks.serve as vs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    vs.add_cli_args(parser)
    args = parser.parse_args([
        "--backend", "openai-chat", "--base-url", a.url, "--endpoint", "/v1/chat/completions",
        "--model", SERVED, "--served-model-name", SERVED, "--tokenizer", a.model,
        "--dataset-name", "custom", "--dataset-path", a.data, "--num-prompts", str(a.prompts),
        "--custom-output-len", str(a.max_tokens), "--skip-chat-template", "--disable-shuffle",
        "--ignore-eos", "--temperature", "0", "--max-concurrency", str(a.concurrency), "--disable-tqdm"])
    sync, box, run = Path(a.sync), {}, vs.benchmark

    async def timed(*args, **kwargs):
        (sync / f"ready.{a.vllm_client}").touch()
        while not (sync / "go").exists():
            await asyncio.sleep(0.005)
        t, cpu = time.time(), common.own_cpu_seconds()
        out = await run(*args, **kwargs)
        box.update(start=t, end=time.time(), cpu_s=common.own_cpu_seconds() - cpu,
                   tokens=out["total_output_tokens"], failed=out["failed"], completed=out["completed"])
        return out

    vs.benchmark = timed
    vs.main(args)
    common.emit(box)


class PoolCpu:
    """CPU seconds the pool's servers and proxy spend between ``start`` and ``stop`` (from /proc)."""

    def __init__(self, servers: set[int], proxy: set[int]):
        self.groups = {"servers_cpu_s": servers, "proxy_cpu_s": proxy}

    def start(self) -> None:
        self.before = {k: common.cpu_seconds(g) for k, g in self.groups.items()}

    def stop(self) -> dict:
        return {k: common.cpu_seconds(g) - self.before[k] for k, g in self.groups.items()}


def measure(client: str, proxy: dict, texts: list[str], args, work: Path, pool_cpu: PoolCpu) -> dict:
    if client == "vllm bench":
        row = vllm_clients(proxy["servers"], proxy["api_key"], texts, args, work, pool_cpu)
    else:
        pool_cpu.start()
        urls = [proxy["url"]] if client == "modelmake" else proxy["servers"]
        row = modelmake_client(urls, proxy["api_key"], texts, args, work)
    row.update(pool_cpu.stop())
    row["tok_s"] = row["tokens"] / row["seconds"]
    return row


def bench_layout(args, servers: int, cores: int, tmp: Path) -> dict[str, list[dict]]:
    texts = prompts(args.prompts)
    rows: dict[str, list[dict]] = {c: [] for c in CLIENTS}
    with pool(args, servers, cores, tmp) as (proxy, server_groups, proxy_groups):
        pool_cpu = PoolCpu(server_groups, proxy_groups)
        # warm-up (not measured): every server answers a few requests through the proxy
        modelmake_client([proxy["url"]], proxy["api_key"], texts[:args.concurrency], args,
                         tmp / f"warm{servers}x{cores}")
        for r in range(args.rounds):
            for client in (CLIENTS if r % 2 == 0 else CLIENTS[::-1]):
                work = tmp / f"{servers}x{cores}" / f"r{r}-{client.replace(' ', '_')}"
                row = measure(client, proxy, texts, args, work, pool_cpu)
                print(json.dumps({"layout": f"{servers}x{cores}", "round": r, "client": client,
                                  **{k: round(v, 3) for k, v in row.items()}}), flush=True)
                rows[client].append(row)
    return rows


def per_1k(row: dict, key: str) -> float:
    return row[key] / row["tokens"] * 1000


def report(args, baseline: dict, layouts: dict[str, dict[str, list[dict]]]) -> None:
    print(f"\noffline (vLLM LLM.chat, every core): {baseline['tokens']} tokens in {baseline['seconds']:.2f} s, "
          f"{baseline['tok_s']:.1f} tok/s")
    summary = {}
    for name, rows in layouts.items():
        servers, cores = map(int, name.split("x"))
        print(f"\nlayout {servers} server(s) x {cores} core(s), {args.prompts} prompts x {args.max_tokens} tokens, "
              f"concurrency {args.concurrency}, best of {args.rounds} round(s):")
        print(f"  {'client':<30} {'tok/s':>8} {'client CPU':>11} {'proxy CPU':>10} {'servers CPU':>12}  "
              f"(CPU s per 1,000 generated tokens)")
        tok_s, share = {}, {}
        for client, rs in rows.items():
            best = max(rs, key=lambda r: r["tok_s"])
            share[client] = (best["client_cpu_s"] + best["proxy_cpu_s"]) / best["servers_cpu_s"]
            tok_s[client] = best["tok_s"]
            print(f"  {client + ' (' + WHERE[client] + ')':<30} {tok_s[client]:>8.1f} "
                  f"{per_1k(best, 'client_cpu_s'):>11.3f} {per_1k(best, 'proxy_cpu_s'):>10.3f} "
                  f"{per_1k(best, 'servers_cpu_s'):>12.3f}  failed {sum(r['failed'] for r in rs)}")
        ratio = tok_s["modelmake"] / tok_s["vllm bench"]
        print(f"  ratio modelmake / vllm bench: {ratio:.3f}"
              + ("" if args.smoke else f" (target >= 0.98: {'met' if ratio >= 0.98 else 'MISSED'})"))
        print(f"  ratio modelmake / offline: {tok_s['modelmake'] / baseline['tok_s']:.3f}; "
              f"modelmake through Traefik / direct: {tok_s['modelmake'] / tok_s['direct']:.3f}")
        print(f"  client + proxy CPU per servers' CPU: modelmake through Traefik {share['modelmake']:.1%}, "
              f"vllm bench {share['vllm bench']:.1%} (what the client side takes from the cores the servers share)")
        summary[name] = tok_s["modelmake"]
    if len(summary) > 1:
        first = next(iter(summary))
        print("\nlayouts, modelmake through Traefik: " + ", ".join(
            f"{n} {v:.1f} tok/s ({v / summary[first]:.2f}x of {first})" for n, v in summary.items()))
    if args.smoke:
        print(common.SMOKE_NOTE)


def bench_model(args, folder: Path) -> str:
    """A random-initialised Llama of the requested size with the demo tokenizer, saved to folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import artifacts

    tok = AutoTokenizer.from_pretrained(artifacts.tokenizer(folder.parent))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, dtype="float32")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a model folder (default: a random Llama of --hidden/--layers)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--layouts", nargs="+", default=["1x2", "2x1"], help="pools to measure: SERVERSxCORES each")
    ap.add_argument("--prompts", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=64, help="requests in flight, over all servers")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="; ".join(f"{k}={v}" for k, v in SMOKE.items())
                    + ": runs end to end, measures nothing")
    ap.add_argument("--offline-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--vllm-client", help=argparse.SUPPRESS)  # internal: one process of vLLM's client
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--sync", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.vllm_client is not None:
        return vllm_client(args)
    if args.smoke:
        vars(args).update(SMOKE)
    if args.offline_only:
        return common.emit(offline(args))
    layouts = [tuple(map(int, x.split("x"))) for x in args.layouts]
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            args.model = bench_model(args, Path(tmp) / "model")
        baseline = common.child([sys.executable, __file__, "--offline-only", "--model", args.model,
                                 "--prompts", str(args.prompts), "--max-tokens", str(args.max_tokens)],
                                "the offline baseline")
        measured = {f"{s}x{c}": bench_layout(args, s, c, Path(tmp)) for s, c in layouts}
    report(args, baseline, measured)


if __name__ == "__main__":
    main()
