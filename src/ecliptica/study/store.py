"""The study's results store: one SQLite file that survives interruption.

Each (arm, seed) run moves pending -> training -> trained -> evaluated (or failed). Every write is
one transaction, so a process killed at any point leaves the last committed state; re-running the
study skips evaluated runs and resumes the rest (training resumes from its latest checkpoint).
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    arm TEXT NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    config_json TEXT NOT NULL,
    train_summary TEXT,
    eval_result TEXT,
    error TEXT,
    updated_at REAL NOT NULL,
    worker TEXT
);
CREATE TABLE IF NOT EXISTS evaluations (  -- one row per (run, evaluation prompt set); runs.eval_result = `test`
    run_id TEXT NOT NULL,
    split TEXT NOT NULL,
    eval_result TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (run_id, split)
);
CREATE TABLE IF NOT EXISTS calibration (  -- one row per sweep point: an arm at one (lr, damping)
    point_id TEXT PRIMARY KEY,
    arm TEXT NOT NULL,
    lr REAL NOT NULL,
    damping REAL,
    status TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    scores TEXT,
    chosen INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    updated_at REAL NOT NULL,
    worker TEXT
);
CREATE TABLE IF NOT EXISTS splits (  -- what each run was trained or evaluated on: sizes + id hashes
    name TEXT PRIMARY KEY,
    description TEXT NOT NULL
);
"""
STATUSES = ("pending", "training", "trained", "evaluated", "failed")


class StudyStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db:
            db.executescript(SCHEMA)
            if "worker" not in {r["name"] for r in db.execute("PRAGMA table_info(runs)")}:
                db.execute("ALTER TABLE runs ADD COLUMN worker TEXT")  # stores written before parallel workers

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")  # readers never block the runner; commits are atomic
        db.row_factory = sqlite3.Row
        return db

    def _exec(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with closing(self._connect()) as db:
            with db:  # one transaction
                return db.execute(sql, args).fetchall()

    def get(self, run_id: str) -> dict | None:
        rows = self._exec("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        return _row(rows[0]) if rows else None

    def all(self) -> list[dict]:
        return [_row(r) for r in self._exec("SELECT * FROM runs ORDER BY arm, seed")]

    def register(self, run_id: str, arm: str, seed: int, config_hash: str, config: dict) -> dict:
        """Add a run, or return the existing one; a changed config for the same run is an error."""
        existing = self.get(run_id)
        if existing is not None:
            if existing["config_hash"] != config_hash:
                raise ValueError(
                    f"{self.path}: run {run_id} exists with a different configuration "
                    f"({existing['config_hash']} vs {config_hash}); use a new study_dir or "
                    f"`--set` back to the original settings"
                )
            return existing
        self._exec(
            "INSERT INTO runs (run_id, arm, seed, status, config_hash, config_json, updated_at) "
            "VALUES (?, ?, ?, 'pending', ?, ?, ?)",
            (run_id, arm, seed, config_hash, json.dumps(config), time.time()),
        )
        return self.get(run_id)

    def set_status(self, run_id: str, status: str, **fields) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        cols, vals = ["status = ?", "updated_at = ?"], [status, time.time()]
        for k, v in fields.items():
            if k not in ("train_summary", "eval_result", "error"):
                raise ValueError(f"unknown field {k!r}")
            cols.append(f"{k} = ?")
            vals.append(json.dumps(v) if k != "error" else v)
        self._exec(f"UPDATE runs SET {', '.join(cols)} WHERE run_id = ?", (*vals, run_id))

    # ------------------------------------------------------- evaluation prompt sets
    def set_evaluation(self, run_id: str, split: str, eval_result: dict) -> None:
        self._exec(
            "INSERT OR REPLACE INTO evaluations (run_id, split, eval_result, updated_at) VALUES (?, ?, ?, ?)",
            (run_id, split, json.dumps(eval_result), time.time()),
        )

    def evaluations(self, split: str | None = None) -> list[dict]:
        """Rows {run_id, split, eval_result}, for one prompt set or all."""
        sql, args = "SELECT * FROM evaluations", ()
        if split is not None:
            sql, args = sql + " WHERE split = ?", (split,)
        return [_row(r) for r in self._exec(sql + " ORDER BY run_id, split", args)]

    # ------------------------------------------------------- splits
    def record_split(self, name: str, description: dict) -> None:
        """Remember a split's description; a different one under the same name is an error (every run of a
        study must train on the same train part and be scored on the same validation part)."""
        with closing(self._connect()) as db:
            with db:
                db.execute(
                    "INSERT OR IGNORE INTO splits (name, description) VALUES (?, ?)",
                    (name, json.dumps(description, sort_keys=True)),
                )
                stored = json.loads(db.execute("SELECT description FROM splits WHERE name = ?", (name,)).fetchone()[0])
        if stored != json.loads(json.dumps(description, sort_keys=True)):
            raise ValueError(f"{self.path}: split {name!r} differs from the recorded one: {stored} vs {description}")

    def splits(self) -> dict[str, dict]:
        return {r["name"]: json.loads(r["description"]) for r in self._exec("SELECT * FROM splits ORDER BY name")}

    # ------------------------------------------------------- calibration sweep
    def register_point(self, point_id: str, arm: str, lr: float, damping: float | None, config_hash: str) -> dict:
        existing = self.point(point_id)
        if existing is not None:
            if existing["config_hash"] != config_hash:
                raise ValueError(
                    f"{self.path}: calibration point {point_id} exists with a different configuration; "
                    "use a new study_dir"
                )
            return existing
        self._exec(
            "INSERT INTO calibration (point_id, arm, lr, damping, status, config_hash, updated_at) "
            "VALUES (?, ?, ?, ?, 'pending', ?, ?)",
            (point_id, arm, lr, damping, config_hash, time.time()),
        )
        return self.point(point_id)

    def point(self, point_id: str) -> dict | None:
        rows = self._exec("SELECT * FROM calibration WHERE point_id = ?", (point_id,))
        return _row(rows[0]) if rows else None

    def set_point(self, point_id: str, status: str, scores: dict | None = None, error: str | None = None) -> None:
        if status not in ("pending", "scored", "failed"):
            raise ValueError(f"unknown calibration status {status!r}")
        self._exec(
            "UPDATE calibration SET status = ?, scores = ?, error = ?, updated_at = ? WHERE point_id = ?",
            (status, json.dumps(scores) if scores is not None else None, error, time.time(), point_id),
        )

    def set_chosen(self, arm: str, point_id: str) -> None:
        with closing(self._connect()) as db:
            with db:
                db.execute("UPDATE calibration SET chosen = 0 WHERE arm = ?", (arm,))
                db.execute("UPDATE calibration SET chosen = 1 WHERE point_id = ?", (point_id,))

    def calibration(self) -> list[dict]:
        """Every sweep point: arm, lr, damping, status, scores (validation accuracy, KL, ...), chosen."""
        rows = [_row(r) for r in self._exec("SELECT * FROM calibration ORDER BY arm, lr, damping")]
        for r in rows:
            r["chosen"] = bool(r["chosen"])
        return rows

    def claim_point(self, point_id: str, worker: str) -> bool:
        """Atomically take a sweep point for one worker; False if another worker holds it."""
        with closing(self._connect()) as db:
            with db:
                cur = db.execute(
                    "UPDATE calibration SET worker = ? WHERE point_id = ? AND worker IS NULL", (worker, point_id)
                )
                return cur.rowcount == 1

    def release_point(self, point_id: str) -> None:
        self._exec("UPDATE calibration SET worker = NULL WHERE point_id = ?", (point_id,))

    # ------------------------------------------------------- parallel workers
    def claim(self, run_id: str, worker: str) -> bool:
        """Atomically take a run for one worker; False if another worker holds it."""
        with closing(self._connect()) as db:
            with db:
                cur = db.execute("UPDATE runs SET worker = ? WHERE run_id = ? AND worker IS NULL", (worker, run_id))
                return cur.rowcount == 1

    def release(self, run_id: str) -> None:
        self._exec("UPDATE runs SET worker = NULL WHERE run_id = ?", (run_id,))

    def release_all(self) -> None:
        """Drop every claim: only the coordinator calls this, before it starts its workers."""
        self._exec("UPDATE runs SET worker = NULL")
        self._exec("UPDATE calibration SET worker = NULL")


def _row(r: sqlite3.Row) -> dict:
    d = dict(r)
    for k in ("config_json", "train_summary", "eval_result", "scores"):
        if d.get(k):
            d[k] = json.loads(d[k])
    return d
