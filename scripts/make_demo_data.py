"""Write the demo's sample chat corpora to resources/demo/ (committed; rerun to regenerate).

The corpora are made by the project, seeded and deterministic: multi-turn conversations in English
and Chinese, in the two shapes the pseudo-label pipeline reads:

* UltraChat raw:   {"id": ..., "data": [user, assistant, user, assistant, ...]}
* ShareGPT-like:   {"id": ..., "conversations": [{"from": "human"|"gpt", "value": ...}, ...]}

Usage: python scripts/make_demo_data.py [--out resources/demo] [--n 200]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

EN_TOPICS = {
    "tea": ("green tea", "Green tea is made from unoxidised leaves and tastes fresh and grassy."),
    "rain": ("rain", "Rain forms when water vapour condenses into drops heavy enough to fall."),
    "python": ("Python lists", "A Python list is an ordered, mutable sequence that can hold any objects."),
    "bread": ("baking bread", "Bread rises because yeast turns sugar into carbon dioxide gas."),
    "moon": ("the moon", "The moon reflects sunlight and takes about 27 days to orbit the Earth."),
    "sleep": ("sleep", "Adults usually need seven to nine hours of sleep to feel rested."),
    "bikes": ("bicycles", "A bicycle turns the push on the pedals into motion through a chain."),
    "rivers": ("rivers", "Rivers carry water from high ground to lakes and the sea."),
    "music": ("music practice", "Short daily practice builds skill faster than rare long sessions."),
    "garden": ("tomato plants", "Tomato plants need sun, warm soil and regular watering."),
    "maps": ("maps", "A map shows places and distances at a fixed scale."),
    "clocks": ("clocks", "A mechanical clock keeps time with a swinging pendulum or a spring."),
}
EN_ASK = [
    "Can you tell me about {t}?",
    "What should I know about {t}?",
    "Please explain {t} in simple words.",
    "I am curious about {t}. Where do I start?",
]
EN_FOLLOW = [
    ("Can you give an example?", "For example, {f}"),
    ("Why does that matter?", "It matters because {f}"),
    ("Thanks! Any tip for a beginner?", "A good tip: start small and be patient. {f}"),
    ("Can you say that more briefly?", "In short: {f}"),
]

ZH_TOPICS = {
    "cha": ("绿茶", "绿茶是用未发酵的茶叶制成的，味道清新。"),
    "yu": ("下雨", "水蒸气凝结成足够重的水滴时就会下雨。"),
    "mianbao": ("烤面包", "酵母把糖变成二氧化碳，所以面包会发起来。"),
    "yueliang": ("月亮", "月亮反射太阳光，大约二十七天绕地球一圈。"),
    "shuimian": ("睡眠", "成年人通常需要七到九个小时的睡眠。"),
    "zixingche": ("自行车", "自行车通过链条把踩踏板的力量变成前进的动力。"),
    "heliu": ("河流", "河流把水从高处带到湖泊和大海。"),
    "yinyue": ("练习音乐", "每天短时间练习比偶尔长时间练习进步更快。"),
    "huayuan": ("种番茄", "番茄需要阳光、温暖的土壤和经常浇水。"),
    "ditu": ("地图", "地图按照固定比例显示地点和距离。"),
}
ZH_ASK = ["你能介绍一下{t}吗？", "关于{t}我应该知道什么？", "请用简单的话解释{t}。", "我对{t}很好奇，从哪里开始？"]
ZH_FOLLOW = [
    ("能举个例子吗？", "比如说，{f}"),
    ("为什么这很重要？", "这很重要，因为{f}"),
    ("谢谢！初学者有什么建议？", "建议从小处开始，耐心一点。{f}"),
    ("能说得更简短一些吗？", "简单地说：{f}"),
]


def conversation(rng: random.Random, topics: dict, ask: list, follow: list) -> list[str]:
    """Alternating user/assistant turns (2 to 6 turns) about one topic."""
    name, fact = topics[rng.choice(sorted(topics))]
    turns = [rng.choice(ask).format(t=name), fact]
    for q, a in rng.sample(follow, k=rng.randint(0, 2)):
        turns += [q, a.format(f=fact)]
    return turns


def ultrachat(rng: random.Random, prefix: str, n: int, *lang) -> list[dict]:
    return [{"id": f"{prefix}-{i:04d}", "data": conversation(rng, *lang)} for i in range(n)]


def sharegpt(rng: random.Random, prefix: str, n: int, *lang) -> list[dict]:
    rows = []
    for i in range(n):
        turns = conversation(rng, *lang)
        conv = [{"from": "human" if k % 2 == 0 else "gpt", "value": t} for k, t in enumerate(turns)]
        rows.append({"id": f"{prefix}-{i:04d}", "conversations": conv})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "resources/demo")
    ap.add_argument("--n", type=int, default=200, help="conversations per file")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    en = (EN_TOPICS, EN_ASK, EN_FOLLOW)
    zh = (ZH_TOPICS, ZH_ASK, ZH_FOLLOW)
    write_jsonl(args.out / "chat_en.jsonl", ultrachat(random.Random(0), "en", args.n, *en))
    write_jsonl(args.out / "chat_zh.jsonl", sharegpt(random.Random(1), "zh", args.n, *zh))


if __name__ == "__main__":
    main()
