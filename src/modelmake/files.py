"""Files: atomic writes, JSON lines, hashes and provenance records.

One place for how modelmake writes anything: to ``<path>.tmp``, fsync, then rename, so a killed
job never leaves a file that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from modelmake import __version__


def tmp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open ``path.tmp`` for writing; on success fsync and rename it to ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    kwargs = {} if "b" in mode else {"encoding": "utf-8"}
    f = open(tmp, mode, **kwargs)
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise


def dumps(obj: Any) -> str:
    """The one JSON encoding for records: UTF-8 text, stable key order as given."""
    return json.dumps(obj, ensure_ascii=False)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, ensure_ascii=False, indent=2, sort_keys=True)
        f.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file written by modelmake (trusted; user input goes through reformat)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def jsonl_objects(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """``(file:line, object)`` of every non-blank line of a user's JSON-lines file.

    A line that is not UTF-8, not JSON or not a JSON object raises :class:`RecordError` naming its
    file:line; checking the fields is the caller's (it has the ``file:line`` to report them with).
    """
    from modelmake.errors import RecordError

    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise RecordError(f"bad record in {where}: not UTF-8 ({e.reason} at byte {e.start}). "
                                  "Fix the line.") from None
            except json.JSONDecodeError as e:
                raise RecordError(f"bad record in {where}: not JSON ({e.msg}, column {e.colno}). "
                                  "Fix the line.") from None
            if not isinstance(obj, dict):
                raise RecordError(f"bad record in {where}: expected a JSON object, got {type(obj).__name__}. "
                                  "Fix the line.")
            yield where, obj


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: str | os.PathLike) -> str:
    """Hash of a file, or of a folder's files (relative names and contents, sorted)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()


def code_version() -> str:
    """modelmake's version plus the git commit of the checkout it runs from, when there is one."""
    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "describe", "--always", "--dirty"],
            capture_output=True, text=True, timeout=10, check=True,
        )
        return f"{__version__}+{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        return __version__


def write_provenance(
    folder_or_file: str | os.PathLike,
    *,
    config: Any,
    inputs: Iterable[str | os.PathLike] = (),
    counts: dict | None = None,
    started: float | None = None,
    name: str = "provenance.json",
) -> Path:
    """Record what made an artifact: config slice, code version, input hashes, counts, wall time.

    For a folder the record is ``<folder>/provenance.json``; for a file ``<file>.provenance.json``.
    """
    target = Path(folder_or_file)
    out = target / name if target.is_dir() else target.with_name(target.name + "." + name)
    record = {
        "code_version": code_version(),
        "config": config,
        "inputs": {str(p): sha256_tree(p) for p in inputs},
        "counts": counts or {},
        "wall_seconds": round(time.time() - started, 3) if started else None,
    }
    write_json(out, record)
    return out
