"""Raw rows from files (jsonl/json/csv/parquet/yaml, optionally .gz) or hub datasets.

Every row comes out as (row_number, dict) with 1-based data row numbers, so errors can name
the row a person would find in the file. Undecodable bytes are kept (as surrogate escapes)
and reported per field by validation instead of crashing the whole read.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

from .schema import BadRow

Row = tuple[int, dict | BadRow]

SUFFIXES = {".jsonl", ".json", ".csv", ".parquet", ".yaml", ".yml", ".prompt"}  # .prompt: PyRIT seed files (YAML)


def _base_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _gunzip(path: Path) -> bytes:
    try:
        return gzip.decompress(path.read_bytes())
    except (EOFError, OSError, zlib.error) as e:  # a truncated download ends mid-stream (EOFError)
        raise ValueError(f"{path}: truncated or corrupt gzip file ({e}); download or compress it again") from None


def _read_text(path: Path) -> str:
    raw = _gunzip(path) if path.suffix.lower() == ".gz" else path.read_bytes()
    # utf-8-sig: a leading byte-order mark (Excel CSVs) must not become part of the first column name.
    return raw.decode("utf-8-sig", errors="surrogateescape")


def looks_like_hub_id(spec: str) -> bool:
    # A missing local file ("data/train.jsonl") is not a hub id: report it missing instead of going online.
    return (
        not Path(spec).exists()
        and spec.count("/") == 1
        and not spec.startswith((".", "/"))
        and _base_suffix(Path(spec)) not in SUFFIXES
    )


def iter_rows(spec: str | Path, split: str = "train") -> Iterator[Row]:
    """Yield (row_number, row) for a local file, or a hub dataset id when online."""
    path = Path(spec)
    if path.is_file():
        yield from _iter_file(path)
        return
    if looks_like_hub_id(str(spec)):
        yield from _iter_hub(str(spec), split)
        return
    raise FileNotFoundError(f"{spec}: no such file (and not a hub id of the form owner/name)")


def _iter_file(path: Path) -> Iterator[Row]:
    kind = _base_suffix(path)
    name = str(path)
    if kind == ".jsonl":
        # split on '\n' only: str.splitlines() also breaks on U+2028, U+0085, ... which JSON strings may hold raw
        for i, line in enumerate(_read_text(path).split("\n"), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield i, BadRow(name, i, "<line>", f"invalid JSON: {e.msg} at column {e.colno}")
                continue
            yield i, obj if isinstance(obj, dict) else BadRow(name, i, "<line>", "not a JSON object")
    elif kind == ".json":
        try:
            data = json.loads(_read_text(path))
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}: invalid JSON at line {e.lineno}: {e.msg}") from e
        if isinstance(data, dict):  # {"data": [...]} or {"train": [...]} style
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise ValueError(f"{name}: expected a list of rows or an object holding one list")
            data = lists[0]
        for i, obj in enumerate(data, start=1):
            yield i, obj if isinstance(obj, dict) else BadRow(name, i, "<row>", "not a JSON object")
    elif kind == ".csv":
        reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
        for i, obj in enumerate(reader, start=1):
            if None in obj:  # more cells than header columns
                yield i, BadRow(name, i, "<row>", "more cells than header columns")
                continue
            yield i, obj
    elif kind in (".yaml", ".yml", ".prompt"):
        import yaml

        try:
            data = yaml.safe_load(_read_text(path))
        except yaml.YAMLError as e:
            raise ValueError(f"{name}: invalid YAML ({e})") from None
        if isinstance(data, dict):  # a header plus one list of rows (PyRIT's `seeds:`)
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise ValueError(f"{name}: expected a list of rows or a mapping holding one list")
            data = lists[0]
        if not isinstance(data, list):
            raise ValueError(f"{name}: expected a list of rows or a mapping holding one list")
        for i, obj in enumerate(data, start=1):
            yield i, obj if isinstance(obj, dict) else BadRow(name, i, "<row>", "not a mapping")
    elif kind == ".parquet":
        import pyarrow.parquet as pq

        if path.suffix.lower() == ".gz":
            import pyarrow as pa

            table = pq.read_table(pa.BufferReader(_gunzip(path)))
        else:
            table = pq.read_table(path)
        for i, obj in enumerate(table.to_pylist(), start=1):
            yield i, obj
    else:
        raise ValueError(f"{name}: unsupported file type {kind!r}; use one of {sorted(SUFFIXES)} (optionally .gz)")


def _iter_hub(hub_id: str, split: str) -> Iterator[Row]:
    from datasets import load_dataset

    ds = load_dataset(hub_id, split=split)
    for i, obj in enumerate(ds, start=1):
        yield i, dict(obj)
