"""Make resources/demo/selfplay/{train,test}.jsonl: UltraChat-200k shaped conversations for the
self-play demo, taken deterministically from resources/demo/chat_en.jsonl (the corpus the demo's
tiny Llama was fitted on, so its answers are in-domain).

UltraChat-200k rows are ``{"prompt", "prompt_id", "messages": [{role, content}, ...]}``; the id is
kept as ``id`` so modelmake's reformat step keeps it. Every fourth conversation of the first 128
goes to the held-out test split, the rest to train.

    python scripts/make_demo_selfplay.py
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "resources/demo/chat_en.jsonl"
OUT = REPO / "resources/demo/selfplay"
N = 128


def main() -> None:
    rows = [json.loads(line) for line in SOURCE.read_text(encoding="utf-8").splitlines()[:N]]
    splits: dict[str, list[str]] = {"train": [], "test": []}
    for i, r in enumerate(rows):
        turns = r["data"]
        messages = [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(turns)]
        row = {"id": f"sp-{r['id']}", "prompt": turns[0], "messages": messages}
        splits["test" if i % 4 == 3 else "train"].append(json.dumps(row, ensure_ascii=False))
    OUT.mkdir(parents=True, exist_ok=True)
    for name, lines in splits.items():
        (OUT / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"{OUT / name}.jsonl: {len(lines)} conversations")


if __name__ == "__main__":
    main()
