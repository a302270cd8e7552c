"""Benchmark: generated tokens/s of the full serving path against vLLM's offline engine.

Both sides answer the same prompts (the first user turn of every demo conversation, repeated to
--prompts) with the same model, greedy, exactly --max-tokens tokens each (ignore_eos), on the same
machine in one run:

  baseline  vLLM's offline ``LLM.chat`` in one process, using every core;
  full path modelmake's client (async, bounded concurrency) -> Traefik -> --servers vLLM servers
            (modelmake.serve.lease, exactly as the pseudo-label rules use it).

Start-up (model load, server health) is excluded from both; the ratio is full path / baseline.
The foundation issue's target is >= 0.95.

Usage: python bench/bench_serving.py [--hidden 512 --layers 8] [--servers 1] [--prompts 400]
       [--concurrency 64] [--max-tokens 64] [--model FOLDER] [--smoke]
Without --model, a random-initialised Llama of the given size is saved with the demo tokenizer
(trained from resources/demo in a temporary folder): the demo's tiny teacher is so small that
per-request HTTP cost, not the model, would decide the ratio.
--smoke: a 1-layer Llama of width 64, 1 server, 8 prompts of 8 tokens, concurrency 4: the same
code paths in about a minute and a half (two vLLM start-ups); its numbers are not benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
SMOKE = {"hidden": 64, "layers": 1, "servers": 1, "prompts": 8, "concurrency": 4, "max_tokens": 8}


def prompts(n: int) -> list[list[dict]]:
    rows = []
    for name in ("chat_en", "chat_zh"):
        for line in (REPO / f"resources/demo/{name}.jsonl").read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            first = r["data"][0] if "data" in r else r["conversations"][0]["value"]
            rows.append([{"role": "user", "content": first}])
    return [rows[i % len(rows)] for i in range(n)]


def offline(args) -> dict:
    """Runs in its own process (see main): vLLM's offline engine on every core."""
    cores = sorted(os.sched_getaffinity(0))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"{cores[0]}-{cores[-1]}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, dtype="float32", max_model_len=512, enforce_eager=True, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    batch = prompts(args.prompts)
    t = time.perf_counter()
    outs = llm.chat(batch, params, use_tqdm=False)
    dt = time.perf_counter() - t
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"tokens": tokens, "seconds": dt, "tok_s": tokens / dt}


def full_path(args) -> dict:
    from modelmake.generate import GenerateSettings, Sampling, generate_records
    from modelmake.serve import PoolSpec, lease

    spec = PoolSpec(model=args.model, served_name="teacher", servers=args.servers, max_model_len=512,
                    dtype="float32", enforce_eager=True, cpu_threads_per_server=max(1, os.cpu_count() // args.servers))
    settings = GenerateSettings(
        model="teacher", sampling=Sampling(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True),
        config_key=None, max_conversation_tokens=512, concurrency=args.concurrency)
    records = [{"id": str(i), "messages": m} for i, m in enumerate(prompts(args.prompts))]
    with tempfile.TemporaryDirectory() as tmp:
        pool, pids = Path(tmp) / "pool", []
        try:
            with lease(spec, pool, Path(tmp) / "logs", ready_timeout_s=900, idle_s=1) as proxy:
                pids = pool_pids(pool)
                journal = io.StringIO()
                t, cpu = time.perf_counter(), time.process_time()
                url = proxy["servers"][0] if args.direct else proxy["url"]
                ok, failed = asyncio.run(generate_records(records, url, settings, journal, api_key=proxy["api_key"]))
                dt, cpu = time.perf_counter() - t, time.process_time() - cpu
        finally:
            stop_pool(pids or pool_pids(pool))
    rows = [json.loads(x) for x in journal.getvalue().splitlines()]
    tokens = sum(r["generation"]["usage"]["completion_tokens"] for r in rows if "error" not in r)
    return {"tokens": tokens, "seconds": dt, "tok_s": tokens / dt, "failed": failed, "client_cpu_s": cpu}


def pool_pids(pool: Path) -> list[int]:
    """The pool's supervisor, servers and proxy, from its state file (each leads its own process group)."""
    try:
        st = json.loads((pool / "state.json").read_text())
    except (OSError, ValueError):
        return []
    return [st["supervisor_pid"], *(s["pid"] for s in st.get("servers", [])),
            *([st["proxy"]["pid"]] if "proxy" in st else [])]


def stop_pool(pids: list[int], timeout_s: float = 60) -> None:
    """Wait for the pool to stop (its supervisor stops it once our lease is gone), then kill, by PID,
    the process group of whatever is left: no server outlives the benchmark."""
    from modelmake.procs import start_time

    started = {pid: start_time(pid) for pid in pids}

    def alive(pid: int) -> bool:  # the same process: a reused PID has another start time
        return started[pid] is not None and start_time(pid) == started[pid]

    deadline = time.monotonic() + timeout_s
    while any(map(alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in pids:
        if alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


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
    ap.add_argument("--servers", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--direct", action="store_true", help="skip Traefik: client -> server 0 (the proxy's share)")
    ap.add_argument("--smoke", action="store_true", help="; ".join(f"{k}={v}" for k, v in SMOKE.items())
                    + ": runs end to end, measures nothing")
    ap.add_argument("--offline-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    if args.offline_only:
        print("BENCH_RESULT " + json.dumps(offline(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            args.model = bench_model(args, Path(tmp) / "model")
        run(args)


def run(args) -> None:
    base = subprocess.run([sys.executable, __file__, "--offline-only", "--model", args.model,
                           "--prompts", str(args.prompts), "--max-tokens", str(args.max_tokens)],
                          capture_output=True, text=True)
    if base.returncode:
        sys.exit(f"the offline baseline failed ({base.returncode}):\n"
                 f"{base.stdout[-2000:]}\n{base.stderr[-3000:]}")
    baseline = json.loads(next(x for x in base.stdout.splitlines() if x.startswith("BENCH_RESULT "))[13:])
    path = full_path(args)
    print(f"{'':>10} {'tokens':>8} {'seconds':>8} {'tok/s':>8}")
    print(f"{'offline':>10} {baseline['tokens']:>8} {baseline['seconds']:>8.2f} {baseline['tok_s']:>8.1f}")
    print(f"{'direct' if args.direct else 'full path':>10} {path['tokens']:>8} {path['seconds']:>8.2f} {path['tok_s']:>8.1f}"
          f"   ({args.servers} servers, concurrency {args.concurrency}, {path['failed']} failed, "
          f"client CPU {path['client_cpu_s']:.1f} s)")
    ratio = path["tok_s"] / baseline["tok_s"]
    if args.smoke:
        print(f"ratio full path / offline: {ratio:.2f}\n"
              "smoke run: every code path ran; these numbers are not a benchmark")
    else:
        print(f"ratio full path / offline: {ratio:.2f} "
              f"(target >= 0.95: {'met' if ratio >= 0.95 else 'MISSED'})")


if __name__ == "__main__":
    main()
