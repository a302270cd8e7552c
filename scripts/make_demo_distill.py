"""Make the distillation demo's small C4-style web text (en and zh), deterministically.

Writes resources/demo/distill/web_en.jsonl and web_zh.jsonl: one {"text", "timestamp", "url"}
object per line (C4's fields), short paragraphs composed from fixed phrase lists with a seeded RNG.
Run from the repository root: python scripts/make_demo_distill.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "resources" / "demo" / "distill"
N = 240  # paragraphs per language

EN = {
    "subject": ["The garden", "A small library", "The river town", "Our kitchen", "The old bridge", "The market",
                "A mountain trail", "The science museum", "The train station", "A quiet cafe"],
    "verb": ["opens early on", "is busy during", "looks beautiful in", "was rebuilt after", "is popular with",
             "closes late on", "welcomes visitors in", "is quiet during"],
    "time": ["weekends", "the spring", "summer evenings", "rainy days", "the holidays", "winter mornings"],
    "detail": ["Local volunteers keep the paths clean.", "Tickets are free for children under twelve.",
               "The coffee is made from beans grown nearby.", "Many families come back every year.",
               "A guide explains the history of the place.", "Bicycles can be parked by the entrance.",
               "The view from the top is worth the climb.", "Fresh bread is sold in the morning."],
    "close": ["Visit the website for opening hours.", "Remember to bring water and a hat.",
              "Photos are welcome, but please do not use a flash.", "Reservations are recommended for groups."],
}
ZH = {
    "subject": ["这个花园", "一家小图书馆", "河边的小镇", "我们的厨房", "那座老桥", "市场", "一条山路", "科学博物馆",
                "火车站", "一家安静的咖啡馆"],
    "verb": ["很早就开门", "总是很热闹", "看起来很美", "重新修建过", "很受欢迎", "很晚才关门", "欢迎游客", "非常安静"],
    "time": ["在周末", "在春天", "在夏天的晚上", "在下雨天", "在假期", "在冬天的早上"],
    "detail": ["当地的志愿者把小路打扫得很干净。", "十二岁以下的儿童免费入场。", "咖啡用附近种的豆子做成。",
               "很多家庭每年都会回来。", "导游会介绍这个地方的历史。", "自行车可以停在入口旁边。",
               "从山顶看到的风景值得一爬。", "早上有新鲜的面包出售。"],
    "close": ["开放时间请查看网站。", "记得带水和帽子。", "欢迎拍照，但请不要使用闪光灯。", "团体参观建议提前预约。"],
}


def paragraph(rng: random.Random, p: dict, zh: bool) -> str:
    parts = []
    for _ in range(rng.randint(2, 4)):
        if zh:
            parts.append(f"{rng.choice(p['subject'])}{rng.choice(p['time'])}{rng.choice(p['verb'])}。")
        else:
            parts.append(f"{rng.choice(p['subject'])} {rng.choice(p['verb'])} {rng.choice(p['time'])}.")
        parts.append(rng.choice(p["detail"]))
    parts.append(rng.choice(p["close"]))
    return ("" if zh else " ").join(parts)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for lang, phrases in (("en", EN), ("zh", ZH)):
        rng = random.Random(f"distill-web-{lang}")
        with open(OUT / f"web_{lang}.jsonl", "w", encoding="utf-8") as f:
            for i in range(N):
                rec = {"text": paragraph(rng, phrases, lang == "zh"),
                       "timestamp": f"2019-04-{1 + i % 28:02d}T12:00:00Z",
                       "url": f"https://example.invalid/{lang}/{i}"}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        print(OUT / f"web_{lang}.jsonl")


if __name__ == "__main__":
    main()
