"""Files: atomic writes, JSON lines, parquet, figures, digests and provenance records.

One place for how modelmake writes anything: to a temporary sibling with a unique name
(``.<name>.<random>.tmp``), fsync, then rename, so a killed job never leaves a file that looks
complete and two writers of one path never share a temporary file.

* :func:`atomic_open` / :func:`atomic_folder`: the atomic file and folder writes;
* :func:`write_parquet`: a table (with its provenance in the schema metadata), atomically;
* :func:`save_figure`: a matplotlib figure as PNG, atomically (:func:`pyplot` gives the Agg pyplot);
* :func:`digest`, :func:`stable_hash`, :func:`sha256_file`, :func:`sha256_tree`: the hashes;
* :func:`provenance_record`, :func:`write_provenance`, :func:`read_provenance`: what made an
  artifact (config slice, code version, input hashes, counts, wall time).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from modelmake import __version__


PROVENANCE_KEY = b"modelmake.provenance"  # the parquet schema metadata key of the provenance record
PROVENANCE_JSON = "provenance.json"  # in a model folder; a file's sidecar is ``<file>.provenance.json``


def _fresh_sibling(path: Path, make: Callable[[Path], Any]) -> tuple[Path, Any]:
    """``(tmp, make(tmp))`` for a fresh ``.<name>.<random>.tmp`` next to ``path``: ``make`` creates
    it exclusively (another random name on the rare clash), so two writers of one path never share it."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return tmp, make(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name next to {path} after 100 tries")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a unique temporary sibling of ``path`` for writing (``mode`` ``"w"``: UTF-8 text, or
    ``"wb"``); on success fsync and rename it to ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _fresh_sibling(path, lambda p: os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        f = os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"}))
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
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


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty folder, a unique temporary sibling of ``path``, to fill; on success it
    replaces ``path``, on an exception it is removed and ``path`` is left as it was.

    An older ``path`` is renamed aside before and removed after, so ``path`` is missing only
    between two renames. Write the folder's completion marker (its manifest) last.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, _ = _fresh_sibling(path, Path.mkdir)
    try:
        yield tmp
        old = None
        if path.exists():
            old, _ = _fresh_sibling(path, Path.mkdir)
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
    """Read a JSON-lines file written by modelmake (trusted; users' records go through
    :func:`modelmake.records.read_records`)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


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


def digest(obj: Any, length: int | None = 16) -> str:
    """The first ``length`` hex characters (None: all 64) of the sha256 of ``obj``.

    Text is hashed as its UTF-8 bytes, bytes as they are, anything else as its JSON with sorted keys
    (``json.dumps(obj, sort_keys=True, default=str)``), so a dict's key order never changes it.
    """
    if isinstance(obj, str):
        data = obj.encode("utf-8")
    elif isinstance(obj, bytes):
        data = obj
    else:
        data = json.dumps(obj, sort_keys=True, default=str).encode()
    h = hashlib.sha256(data).hexdigest()
    return h if length is None else h[:length]


def stable_hash(key: str) -> int:
    """A 64-bit integer of ``key`` (the first 8 bytes of its sha256, big-endian) that, unlike
    ``hash()``, is the same in every process: for buckets (shards, folds) and seeded coin flips."""
    return int(digest(key, 16), 16)


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


def _input_digest(path: str | os.PathLike) -> str:
    """sha256_tree of an input; a hub dataset id (modelmake.records) is not a path and is not hashed."""
    from modelmake.records import is_hub

    return "hub dataset: not hashed" if is_hub(path) else sha256_tree(path)


def provenance_record(
    *,
    config: Any,
    inputs: Iterable[str | os.PathLike] = (),
    counts: dict | None = None,
    started: float | None = None,
) -> dict:
    """What made an artifact: config slice, code version, input hashes, counts, wall time."""
    return {
        "code_version": code_version(),
        "config": config,
        "inputs": {str(p): _input_digest(p) for p in inputs},
        "counts": counts or {},
        "wall_seconds": round(time.time() - started, 3) if started else None,
    }


def write_provenance(
    folder_or_file: str | os.PathLike,
    *,
    config: Any,
    inputs: Iterable[str | os.PathLike] = (),
    counts: dict | None = None,
    started: float | None = None,
    name: str = PROVENANCE_JSON,
) -> Path:
    """Write :func:`provenance_record` beside an artifact.

    For a folder the record is ``<folder>/provenance.json``; for a file ``<file>.provenance.json``
    (a parquet file holds it in its schema metadata instead: see :func:`write_parquet`).
    """
    target = Path(folder_or_file)
    out = target / name if target.is_dir() else target.with_name(target.name + "." + name)
    write_json(out, provenance_record(config=config, inputs=inputs, counts=counts, started=started))
    return out


def read_provenance(path: str | os.PathLike) -> dict:
    """The provenance record of an artifact, ``{}`` when it has none: a folder's
    ``provenance.json``, a parquet file's schema metadata, or else a file's
    ``<file>.provenance.json``. A missing ``path`` raises FileNotFoundError."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder, so no provenance to read")
    if path.is_dir():
        sidecar = path / PROVENANCE_JSON
    else:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            meta = pq.read_schema(path).metadata or {}
            if PROVENANCE_KEY in meta:
                return json.loads(meta[PROVENANCE_KEY])
        sidecar = path.with_name(f"{path.name}.{PROVENANCE_JSON}")
    return read_json(sidecar) if sidecar.is_file() else {}


def _json_default(obj: Any) -> Any:
    """numpy scalars as Python numbers; anything else unknown to JSON as its text."""
    return obj.item() if hasattr(obj, "item") and callable(obj.item) else str(obj)


def write_parquet(
    data: Any, out: str | os.PathLike, *, provenance: dict | None = None, schema: Any = None
) -> Path:
    """Write a table as parquet atomically, with ``provenance`` (a :func:`provenance_record`) as JSON
    in its schema metadata under ``modelmake.provenance`` (read it with :func:`read_provenance`).

    ``data`` is a ``pyarrow.Table``, a pandas DataFrame (its index is not written) or a list of
    dicts; ``schema`` (a ``pyarrow.Schema``) types a list of dicts, which an empty list needs.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(data, pa.Table):
        table = data
    elif isinstance(data, list):
        table = pa.Table.from_pylist(data, schema=schema)
    else:
        table = pa.Table.from_pandas(data, preserve_index=False)
    if provenance is not None:
        record = json.dumps(provenance, ensure_ascii=False, default=_json_default).encode()
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), PROVENANCE_KEY: record})
    with atomic_open(out, "wb") as f:
        pq.write_table(table, f)
    return Path(out)


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (PNG files, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, png: str | os.PathLike, dpi: int = 100) -> Path:
    """Save a matplotlib figure as a PNG atomically, then close it (also when saving fails)."""
    import matplotlib.pyplot as plt

    try:
        with atomic_open(png, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return Path(png)
