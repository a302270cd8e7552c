"""Write the arena demo's pairwise records to resources/demo/arena/ (committed; rerun to regenerate).

Made by the project, seeded and deterministic, English and Chinese, on the topics of the chat
corpora (so the demo tokenizer knows the words):

* ``labelled.jsonl``:   {id, prompt, response_a, response_b, winner, language}, winner in
  {model_a, model_b};
* ``unlabelled.jsonl``: the same without ``winner`` (pseudo-labelled by the stage-1 models);
* ``prompts.jsonl``:    {id, prompt, language}, the prompt pool the response-pair step samples.

The learnable signal: the better response is on topic and complete (the topic's fact plus an
elaboration); the worse one is off topic, evasive or cut short. ``--noise`` of the labels are
flipped (seeded), so a perfect classifier scores about 1 - noise.

Usage: python scripts/make_demo_arena.py [--out resources/demo/arena] [--labelled 480]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_demo_data import EN_ASK, EN_FOLLOW, EN_TOPICS, ZH_ASK, ZH_FOLLOW, ZH_TOPICS, write_jsonl  # noqa: E402

LANGS = {
    "en": {
        "topics": EN_TOPICS, "ask": EN_ASK, "follow": EN_FOLLOW,
        "evasive": ["I am not sure.", "Maybe. It depends.", "I don't know much about that.", "Hard to say."],
    },
    "zh": {
        "topics": ZH_TOPICS, "ask": ZH_ASK, "follow": ZH_FOLLOW,
        "evasive": ["我不太确定。", "也许吧，看情况。", "这个我不太了解。", "很难说。"],
    },
}


def good_answer(rng: random.Random, lang: dict, fact: str) -> str:
    extra = rng.sample(lang["follow"], k=rng.randint(1, 2))
    return " ".join([fact] + [a.format(f=fact) for _q, a in extra])


def bad_answer(rng: random.Random, lang: dict, topic: str, fact: str) -> str:
    kind = rng.choice(["off_topic", "evasive", "cut"])
    if kind == "off_topic":
        other = rng.choice([k for k in sorted(lang["topics"]) if k != topic])
        return lang["topics"][other][1]
    if kind == "evasive":
        return rng.choice(lang["evasive"])
    return fact[: max(4, len(fact) // 3)]


def pair(rng: random.Random, i: int, code: str, noise: float, labelled: bool, prefix: str, seen: set) -> dict:
    """One pair whose text (in either order) no other pair of any file has: a pair in the validation
    fold must not reappear in training data."""
    lang = LANGS[code]
    while True:
        topic = rng.choice(sorted(lang["topics"]))
        name, fact = lang["topics"][topic]
        prompt = rng.choice(lang["ask"]).format(t=name)
        good, bad = good_answer(rng, lang, fact), bad_answer(rng, lang, topic, fact)
        if (prompt, good, bad) not in seen:
            seen.add((prompt, good, bad))
            break
    a_good = rng.random() < 0.5
    row = {"id": f"{prefix}-{code}-{i:04d}", "prompt": prompt,
           "response_a": good if a_good else bad, "response_b": bad if a_good else good}
    if labelled:
        winner_a = a_good if rng.random() >= noise else not a_good
        row["winner"] = "model_a" if winner_a else "model_b"
    row["language"] = code
    return row


def prompts(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        code = "en" if i % 2 == 0 else "zh"
        lang = LANGS[code]
        name, _fact = lang["topics"][rng.choice(sorted(lang["topics"]))]
        rows.append({"id": f"prompt-{code}-{i:04d}", "prompt": rng.choice(lang["ask"]).format(t=name),
                     "language": code})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "resources/demo/arena")
    ap.add_argument("--labelled", type=int, default=480)
    ap.add_argument("--unlabelled", type=int, default=240)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--noise", type=float, default=0.1)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(3)
    codes, seen = ["en", "zh"], set()
    write_jsonl(args.out / "labelled.jsonl",
                [pair(rng, i, codes[i % 2], args.noise, True, "lab", seen) for i in range(args.labelled)])
    write_jsonl(args.out / "unlabelled.jsonl",
                [pair(rng, i, codes[i % 2], args.noise, False, "unl", seen) for i in range(args.unlabelled)])
    write_jsonl(args.out / "prompts.jsonl", prompts(rng, args.prompts))


if __name__ == "__main__":
    main()
