"""Write the router demo's scored prompt set to resources/demo/router/ (committed; rerun to regenerate).

Made by the project, seeded and deterministic. Each line is one prompt with the quality (1..5, as an
expert judge would grade an answer) that a *weak* and a *strong* model earned on it, and the
training conversation the router learns from (the original recipe's format):

    {"id": "r-0000", "prompt": "...", "topic": "...", "weak_score": 2, "strong_score": 5,
     "messages": [{"role": "system", "content": <instruction>},
                  {"role": "user", "content": "[Question]\\n<prompt>\\n\\nPrediction:\\n"},
                  {"role": "assistant", "content": "[[2]]"}]}

The label is the weak model's score. The signal is learnable from the prompt text: the weak model's
expected score depends on the topic (greetings are easy, proofs are hard) and falls with the number
of requirements in the prompt; the strong model is good almost everywhere; both get seeded noise.
So a router that reads the prompt can beat a random one, but not perfectly.

Usage: python scripts/make_demo_router.py [--out resources/demo/router] [--n 1000] [--seed 2]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# A short instruction keeps the tiny demo's sequences short (CPU time); a real run uses the original's long one.
SYSTEM = "Predict the expert score of a small assistant's answer: [[1]] to [[5]]."

# topic: (weak model's mean score, strong model's mean score, templates, fillers)
TOPICS = {
    "greeting": (4.7, 4.9, [
        "Hi there, how are you today?", "Good morning! Say hello to {x}.", "Hello, can you greet {x} for me?",
        "Hey, nice to meet you. How is {x}?", "Thanks a lot for the help with {x}!",
    ], ["my friend", "the team", "my mother", "everyone", "the weekend", "your day"]),
    "fact": (4.1, 4.8, [
        "What is the capital of {x}?", "Which language is spoken in {x}?", "What colour is the flag of {x}?",
        "Name a famous river in {x}.", "What currency does {x} use?",
    ], ["France", "Japan", "Kenya", "Peru", "Norway", "Egypt", "Canada", "India"]),
    "rewrite": (3.7, 4.7, [
        "Rewrite this sentence more politely: {x}", "Summarize in one line: {x}",
        "Fix the grammar of: {x}", "Make this shorter: {x}",
    ], ["send me the file now.", "the meeting was long and nobody listened.",
        "i has went to the shop yesterday.", "we should maybe think about possibly changing the plan."]),
    "story": (3.1, 4.6, [
        "Write a short poem about {x}.", "Tell a bedtime story about {x}.",
        "Write a haiku about {x}.", "Invent a fable featuring {x}.",
    ], ["a lonely robot", "the sea at night", "a brave mouse", "autumn leaves", "a lost key"]),
    "code": (2.4, 4.4, [
        "Write a Python function that {x}.", "Implement in C++ a class that {x}.",
        "Debug this code: it should {x} but crashes.", "Write a SQL query that {x}.",
    ], ["merges two sorted lists", "parses a CSV file with quoted fields", "finds the longest palindrome",
        "caches results with an LRU policy", "returns the top three customers by revenue"]),
    "math": (1.7, 4.2, [
        "Prove that {x}.", "Derive a closed form showing that {x}.",
        "Show step by step, with a rigorous argument, that {x}.",
    ], ["the square root of 2 is irrational", "there are infinitely many primes",
        "the sum of the first n odd numbers is n squared", "every bounded monotone sequence converges"]),
    "expert": (2.1, 4.0, [
        "As a lawyer, explain the liability issues when {x}.", "Give a medical differential diagnosis for {x}.",
        "Analyse the tax consequences when {x}.",
    ], ["a tenant breaks a lease early", "chest pain with fever", "a company moves abroad",
        "a contractor misses a deadline"]),
}
EXTRA = [
    " Include examples.", " Cite your sources.", " Use at most fifty words.", " Explain each step.",
    " Compare two alternatives.", " Format the answer as a table.",
]


def clip_score(x: float) -> int:
    return max(1, min(5, round(x)))


def make(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    names = sorted(TOPICS)
    rows = []
    for i in range(n):
        topic = rng.choice(names)
        weak_mean, strong_mean, templates, fillers = TOPICS[topic]
        k = rng.choice([0, 0, 0, 1, 1, 2])  # extra requirements make a prompt harder for the weak model
        prompt = rng.choice(templates).format(x=rng.choice(fillers)) + "".join(rng.sample(EXTRA, k))
        weak = clip_score(weak_mean - 0.45 * k + rng.gauss(0, 0.6))
        strong = clip_score(strong_mean - 0.1 * k + rng.gauss(0, 0.4))
        rows.append({
            "id": f"r-{i:04d}",
            "prompt": prompt,
            "topic": topic,
            "weak_score": weak,
            "strong_score": strong,
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"[Question]\n{prompt}\n\nPrediction:\n"},
                {"role": "assistant", "content": f"[[{weak}]]"},
            ],
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="resources/demo/router")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=2)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = make(a.n, a.seed)
    with open(out / "scored_prompts.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} prompts to {out / 'scored_prompts.jsonl'}")


if __name__ == "__main__":
    main()
