"""Helpers for the data tests: write small tables in every supported file type (optionally gzipped)."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import pytest


def table_bytes(kind: str, rows: list[dict], columns: list[str] | None = None) -> bytes:
    if kind == ".jsonl":
        return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()
    if kind == ".json":
        return json.dumps(rows).encode()
    if kind == ".csv":
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=columns or list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})
        return buf.getvalue().encode()
    if kind == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows), sink)
        return sink.getvalue().to_pybytes()
    raise ValueError(kind)


def write_table(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    """Write rows to `path`; the file type comes from its suffix, with an optional trailing .gz."""
    gz = path.suffix == ".gz"
    kind = Path(path.stem).suffix if gz else path.suffix
    data = table_bytes(kind, rows, columns)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.fixture
def write(tmp_path):
    """write(name, rows) -> path inside tmp_path."""

    def _write(name: str, rows: list[dict], columns: list[str] | None = None) -> Path:
        return write_table(tmp_path / name, rows, columns)

    return _write
