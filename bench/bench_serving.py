"""Benchmark: generated tokens/s of the full serving path against vLLM's offline engine.

Both sides answer the same prompts (the first user turn of every demo conversation, repeated to
--prompts) with the same model, greedy, same max_tokens, and on the same machine in one run:

  baseline  vLLM's offline ``LLM.chat`` in one process, using every core;
  full path modelmake's client (async, bounded concurrency) -> Traefik -> --servers vLLM servers
            (modelmake.serve.lease, exactly as the pseudo-label rules use it).

Start-up (model load, server health) is excluded from both; the ratio is full path / baseline.
The foundation issue's target is >= 0.95.

Usage: python bench/bench_serving.py [--model results/assets/models/tiny-llama] [--servers 2]
       [--prompts 800] [--concurrency 32] [--max-tokens 64]
The model folder is built by `snakemake results/assets/models/tiny-llama` when missing.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
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
    settings = GenerateSettings(model="teacher", sampling=Sampling(temperature=0.0, max_tokens=args.max_tokens),
                                max_conversation_tokens=512, concurrency=args.concurrency)
    records = [{"id": str(i), "messages": m} for i, m in enumerate(prompts(args.prompts))]
    with tempfile.TemporaryDirectory() as tmp, \
            lease(spec, Path(tmp) / "pool", Path(tmp) / "logs", ready_timeout_s=900, idle_s=1) as proxy:
        journal = io.StringIO()
        t = time.perf_counter()
        ok, failed = asyncio.run(generate_records(records, proxy["url"], settings, journal))
        dt = time.perf_counter() - t
    rows = [json.loads(x) for x in journal.getvalue().splitlines()]
    tokens = sum(r["generation"]["usage"]["completion_tokens"] for r in rows if "error" not in r)
    return {"tokens": tokens, "seconds": dt, "tok_s": tokens / dt, "failed": failed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "results/assets/models/tiny-llama"))
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=800)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--offline-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.offline_only:
        print(json.dumps(offline(args)))
        return
    if not Path(args.model).exists():
        subprocess.run([str(Path(sys.executable).with_name("snakemake")), "--cores", "2", args.model],
                       cwd=REPO, check=True)
    base = subprocess.run([sys.executable, __file__, "--offline-only", *sys.argv[1:]],
                          capture_output=True, text=True, check=True)
    baseline = json.loads(base.stdout.strip().splitlines()[-1])
    path = full_path(args)
    print(f"{'':>10} {'tokens':>8} {'seconds':>8} {'tok/s':>8}")
    print(f"{'offline':>10} {baseline['tokens']:>8} {baseline['seconds']:>8.2f} {baseline['tok_s']:>8.1f}")
    print(f"{'full path':>10} {path['tokens']:>8} {path['seconds']:>8.2f} {path['tok_s']:>8.1f}"
          f"   ({args.servers} servers, concurrency {args.concurrency}, {path['failed']} failed)")
    ratio = path["tok_s"] / baseline["tok_s"]
    print(f"ratio full path / offline: {ratio:.2f} (target >= 0.95: {'met' if ratio >= 0.95 else 'MISSED'})")


if __name__ == "__main__":
    main()
