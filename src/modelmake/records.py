"""Users' records: the one reader behind every pipeline's entrance.

:func:`read_records` yields ``(where, record)`` for every record of a *source*, whatever its shape:

* JSON lines: ``.jsonl``, ``.json`` (JSON lines, or one JSON array of objects), each also
  gzip- (``.gz``) or zstd-compressed (``.zst``, with the ``zstandard`` package): C4 shards are
  ``.json.gz``;
* tables: ``.parquet`` (read by batches), ``.csv`` (also ``.csv.gz`` / ``.csv.zst``; a header row,
  every cell text), a folder written by ``datasets``' ``save_to_disk`` (holding ``state.json``);
* a hub dataset, ``hf://owner/name[:config][@split]``, read through ``datasets.load_dataset``
  (streaming) where the machine reaches the hub; it is not a path, so nothing checks it up front.

Records stream: a line or a batch of rows at a time (a JSON array is the exception: it is parsed
whole). A leading UTF-8 byte-order mark is dropped. Values are plain Python (str, numbers, lists,
dicts, None). ``where`` is a :class:`Where`, text of the form ``file:line`` for line formats and
``file:row N`` for tables (rows count from 1, a CSV header not counted), as error messages give it.

``fields`` maps canonical names to the names in the source (``{"text": "raw_content"}``): each
record gets the canonical key with that value, so pipelines read canonical names whatever the
source calls them. A record without a ``required`` field (after mapping) is a bad record whose
message names the config key to set (``config_key``).

A record that cannot be read (not UTF-8, not JSON, not an object, a CSV row of the wrong width, a
required field missing) raises :class:`RecordError` naming its ``where``, or, with ``on_bad``, is
handed to it as a :class:`Problem` and skipped (reformat's ``on_error: skip``). A source that cannot
be read at all (unknown format, missing, corrupt or truncated compressed data, a broken JSON array)
always raises.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from modelmake.errors import RecordError

HUB_SCHEME = "hf://"
BOM = b"\xef\xbb\xbf"
BATCH_ROWS = 1024  # rows per batch read from parquet and datasets

# suffix -> (format, compression); the longest matching suffix wins
SUFFIXES = {
    f"{base}{ext}": (fmt, comp)
    for base, fmt in ((".jsonl", "jsonl"), (".json", "json"), (".csv", "csv"))
    for ext, comp in (("", None), (".gz", "gzip"), (".zst", "zstd"))
}
SUFFIXES[".parquet"] = ("parquet", None)
SUPPORTED = (", ".join(sorted(SUFFIXES)) + ", a folder saved by datasets' save_to_disk (with state.json), "
             f"or a hub dataset {HUB_SCHEME}owner/name[:config][@split]")


class Where(str):
    """Where a record is, as text (``file:line`` or ``file:row N``), with its parts: ``file``,
    ``line`` or ``row`` (the other is None), and :attr:`raw`."""

    def __new__(cls, file: str, *, line: int | None = None, row: int | None = None, raw: bytes | None = None):
        self = super().__new__(cls, f"{file}:{line}" if line is not None else f"{file}:row {row}")
        self.file, self.line, self.row, self._raw = file, line, row, raw
        return self

    @property
    def raw(self) -> str | None:
        """The line as read, for a rejects file (line formats; None for tables). Keep ``str(where)``,
        not the Where, to remember a place without its line."""
        return None if self._raw is None else self._raw.decode("utf-8", errors="replace").rstrip("\r\n")


@dataclass
class Problem:
    """A record the reader cannot make: ``kind`` names its class (invalid UTF-8, bad JSON, wrong
    type, bad CSV, missing field), ``reason`` says why."""

    where: Where
    kind: str
    reason: str


class _Bad(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def is_hub(source: str | os.PathLike) -> bool:
    """True for a hub dataset id (``hf://...``), which is not a path."""
    return str(source).startswith(HUB_SCHEME)


def hub_spec(source: str) -> tuple[str, str | None, str | None]:
    """``(name, config, split)`` of ``hf://owner/name[:config][@split]``."""
    rest = source[len(HUB_SCHEME):]
    rest, _, split = rest.rpartition("@") if "@" in rest else (rest, "", "")
    name, _, config = rest.partition(":")
    if not name:
        raise RecordError(f"{source}: no dataset name; write {HUB_SCHEME}owner/name[:config][@split]")
    return name, config or None, split or None


def source_format(source: str | os.PathLike) -> tuple[str, str | None]:
    """``(format, compression)`` of a source: format one of jsonl, json, csv, parquet, datasets, hub.
    Raises :class:`RecordError` for a source that is missing or of no supported format."""
    problem = source_problem(source)
    if problem:
        raise RecordError(f"{problem}.")
    if is_hub(source):
        return "hub", None
    if Path(source).is_dir():
        return "datasets", None
    name = Path(source).name.lower()
    return SUFFIXES[max((s for s in SUFFIXES if name.endswith(s)), key=len)]


def source_problem(source: str | os.PathLike) -> str | None:
    """Why ``source`` cannot be read, or None: the config check asks this of every input (a hub id
    is not checked: that needs the hub)."""
    if is_hub(source):
        return None
    path = Path(source)
    if path.is_dir():
        if (path / "state.json").is_file():
            return None
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
            return (f"{str(source)!r} holds the datasets splits {', '.join(splits)}: name one of its split "
                    f"folders (e.g. {path / (splits[0] if splits else 'train')})")
        return f"{str(source)!r} is a folder but not one saved by datasets' save_to_disk (no state.json)"
    if not path.is_file():
        return f"file {str(source)!r} does not exist (relative to {Path.cwd()})"
    name = path.name.lower()
    if not any(name.endswith(s) for s in SUFFIXES):
        return f"{str(source)!r}: unknown format (by its suffix); modelmake reads {SUPPORTED}"
    return None


def read_records(
    source: str | os.PathLike,
    *,
    fields: Mapping[str, str] | None = None,
    required: tuple[str, ...] | list[str] = (),
    config_key: str | Mapping[str, str] = "fields",
    on_bad: Callable[[Problem], None] | None = None,
) -> Iterator[tuple[Where, dict]]:
    """``(where, record)`` of every record of ``source`` (see the module docstring).

    ``fields``: {canonical name: name in the source}; ``required``: canonical names a record must
    have; ``config_key``: the config key of the field map, named when a required field is missing
    (``router.fields`` gives ``router.fields.prompt``), or {canonical name: its own key}
    (``{"text": "distill.web.text_field"}``); ``on_bad``: called with each unreadable record, which
    is then skipped (without it, the first raises :class:`RecordError`).
    """
    fmt, compression = source_format(source)
    fields = {k: v for k, v in (fields or {}).items() if v}
    items = {"jsonl": _jsonl, "json": _json, "csv": _csv, "parquet": _parquet, "datasets": _datasets,
             "hub": _hub}[fmt](str(source), compression)
    for where, rec in items:
        try:
            if isinstance(rec, _Bad):
                raise rec
            if fields:
                rec.update({canon: rec[name] for canon, name in fields.items() if name in rec})
            for canon in required:
                if canon not in rec:
                    raise _Bad("missing field", _missing(canon, rec, fields, config_key))
        except _Bad as e:
            problem = Problem(where, e.kind, e.reason)
            if on_bad is None:
                fix = "" if e.kind == "missing field" else f" Fix the {'line' if where.line is not None else 'record'}."
                raise RecordError(f"bad record in {where}: {e.reason}.{fix}") from None
            on_bad(problem)
            continue
        yield where, rec


def _missing(canon: str, rec: dict, fields: Mapping[str, str], config_key: str | Mapping[str, str]) -> str:
    key = config_key.get(canon, "fields") if isinstance(config_key, Mapping) else f"{config_key}.{canon}"
    has = ", ".join(map(str, list(rec)[:12])) + (", ..." if len(rec) > 12 else "") or "none"
    if fields.get(canon, canon) != canon:
        return (f"no field {fields[canon]!r}, which {key} names for {canon!r} (its fields: {has}); set {key} "
                "to the field that holds it")
    return f"no field {canon!r} (its fields: {has}); if another field holds it, set {key} to its name"


# --- line formats ---------------------------------------------------------------------------------


def _broken() -> tuple[type, ...]:
    """What reading corrupt or truncated (compressed) data raises."""
    try:
        from zstandard import ZstdError
    except ImportError:
        ZstdError = OSError
    return OSError, EOFError, zlib.error, ZstdError


def _unreadable(location: str, compression: str | None, e: Exception) -> RecordError:
    return RecordError(f"{location}: cannot read the {compression or 'file'} data ({type(e).__name__}: {e}). "
                       "The file is corrupt or truncated: fix it or fetch it again.")


def _open(path: str, compression: str | None):
    if compression is None:
        return open(path, "rb")
    if compression == "gzip":
        return gzip.open(path, "rb")
    try:
        import zstandard
    except ImportError:
        raise RecordError(f"{path}: reading .zst needs the zstandard package (envs/cpu.lock.txt pins it); "
                          "install it or decompress the file") from None
    raw = open(path, "rb")
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True))


def _lines(path: str, compression: str | None) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of every line, BOM dropped from line 1; unreadable compressed data raises."""
    broken = _broken()
    with _open(path, compression) as f:
        n = 0
        lines = iter(f)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except broken as e:
                raise _unreadable(f"{path}:{n + 1}", compression, e) from None
            n += 1
            if n == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            yield n, raw


def _object(text: str) -> Any:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise _Bad("bad JSON", f"bad JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise _Bad("bad JSON", "bad JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise _Bad("wrong type", f"a record must be a JSON object, got {type(obj).__name__}")
    return obj


def _decode(raw: bytes, first: bool) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        utf16 = first and raw[:2] in (b"\xff\xfe", b"\xfe\xff")
        raise _Bad("invalid UTF-8", "invalid UTF-8: the file is UTF-16 (it starts with its byte-order mark); "
                   "save it as UTF-8" if utf16 else f"invalid UTF-8 at byte {e.start} ({e.reason})") from None


def _jsonl(path: str, compression: str | None) -> Iterator[tuple[Where, Any]]:
    for n, raw in _lines(path, compression):
        if not raw.strip():
            continue
        where = Where(path, line=n, raw=raw)
        try:
            yield where, _object(_decode(raw, n == 1))
        except _Bad as e:
            yield where, e


def _first_char(path: str, compression: str | None) -> bytes:
    """The first byte of the file that is not a BOM or JSON whitespace (b"" for an empty file)."""
    with _open(path, compression) as f:
        head = f.read(len(BOM))
        head = head[len(BOM):] if head == BOM else head
        while True:
            stripped = head.lstrip(b" \t\r\n")
            if stripped:
                return stripped[:1]
            head = f.read(1 << 16)
            if not head:
                return b""


_WS = re.compile(r"[ \t\n\r]*")


def _json(path: str, compression: str | None) -> Iterator[tuple[Where, Any]]:
    """A .json file: JSON lines, or one JSON array of records (parsed whole; rows count its items)."""
    try:
        first = _first_char(path, compression)
        if first == b"[":
            with _open(path, compression) as f:
                data = f.read()
    except _broken() as e:
        raise _unreadable(path, compression, e) from None
    if first != b"[":
        yield from _jsonl(path, compression)
        return
    data = data[len(BOM):] if data.startswith(BOM) else data
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise RecordError(f"bad record in {path}:{line}: invalid UTF-8 ({e.reason}). Fix the file.") from None

    def broken(pos: int, why: str) -> RecordError:
        line = text.count("\n", 0, pos) + 1
        col = pos - (text.rfind("\n", 0, pos) + 1) + 1
        return RecordError(f"bad JSON in {path}:{line}: {why} at column {col}; a JSON array cannot be read past "
                           "it. Fix the file.")

    decoder = json.JSONDecoder()
    i = _WS.match(text, 1 + _WS.match(text).end()).end()  # after "["
    row = 0
    if text[i:i + 1] == "]":
        i += 1
    else:
        while True:
            try:
                obj, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise broken(e.pos, e.msg) from None
            except RecursionError:
                raise broken(i, "nested too deeply") from None
            row += 1
            where = Where(path, row=row)
            yield where, obj if isinstance(obj, dict) else _Bad(
                "wrong type", f"a record must be a JSON object, got {type(obj).__name__}")
            i = _WS.match(text, end).end()
            if text[i:i + 1] == ",":
                i = _WS.match(text, i + 1).end()
            elif text[i:i + 1] == "]":
                i += 1
                break
            else:
                raise broken(i, "expected ',' or ']' after an item")
    if _WS.match(text, i).end() != len(text):
        raise broken(_WS.match(text, i).end(), "more after the closing ']'")


# --- tables ---------------------------------------------------------------------------------------


def _csv(path: str, compression: str | None) -> Iterator[tuple[Where, Any]]:
    """A CSV file with a header row; every cell is text (numbers too)."""
    csv.field_size_limit(2**31 - 1)  # web text: the default 128 KiB per cell is too small
    row = 0
    with _open(path, compression) as binary:
        reader = csv.reader(io.TextIOWrapper(binary, encoding="utf-8-sig", newline=""))
        try:
            header = next(reader, None)
            if not header:
                raise RecordError(f"{path}: no header row; a CSV file starts with one naming its columns")
            if len(set(header)) != len(header):
                dup = sorted({h for h in header if header.count(h) > 1})
                raise RecordError(f"{path}: the header names {', '.join(map(repr, dup))} twice; make column names unique")
            for cells in reader:
                if not cells:
                    continue
                row += 1
                where = Where(path, row=row)
                if len(cells) != len(header):
                    yield where, _Bad("bad CSV", f"{len(cells)} cells, the header has {len(header)}")
                else:
                    yield where, dict(zip(header, cells))
        except UnicodeDecodeError as e:
            raise RecordError(f"bad record in {path}:row {row + 1}: invalid UTF-8 ({e.reason}). "
                              "Save the file as UTF-8.") from None
        except csv.Error as e:
            raise RecordError(f"bad record in {path}:row {row + 1}: bad CSV ({e}). Fix the file.") from None


def _table_rows(where_of: Callable[[int], Where], batches) -> Iterator[tuple[Where, dict]]:
    n = 0
    for batch in batches:
        for rec in batch.to_pylist():
            n += 1
            yield where_of(n), rec


def _parquet(path: str, _: None) -> Iterator[tuple[Where, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        yield from _table_rows(lambda n: Where(path, row=n), pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS))
    except (pa.ArrowException, OSError) as e:
        raise RecordError(f"{path}: not a readable parquet file ({e}). Fix or re-export it.") from None


def _datasets(path: str, _: None) -> Iterator[tuple[Where, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # what datasets raises for a damaged folder varies
        raise RecordError(f"{path}: datasets.load_from_disk cannot read it ({type(e).__name__}: {e})") from None
    yield from _table_rows(lambda n: Where(path, row=n), ds.with_format("arrow").iter(batch_size=BATCH_ROWS))


def _hub(source: str, _: None) -> Iterator[tuple[Where, Any]]:
    import datasets

    name, config, split = hub_spec(source)
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # hub, network and dataset-script errors all land here
        raise RecordError(
            f"{source}: datasets.load_dataset({name!r}, {config!r}, split={split!r}) failed ({type(e).__name__}: "
            f"{e}). A hub dataset needs the hub to be reachable from this machine."
        ) from None
    if isinstance(ds, Mapping):  # no split named
        if len(ds) != 1:
            raise RecordError(f"{source}: the dataset has the splits {', '.join(ds)}; name one: "
                              f"{source}@{next(iter(ds), 'train')}")
        ds = next(iter(ds.values()))
    yield from _table_rows(lambda n: Where(source, row=n), ds.with_format("arrow").iter(batch_size=BATCH_ROWS))
