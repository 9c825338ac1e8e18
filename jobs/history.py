"""Run history of scheduled pipelines, in SQLite, owned by the scheduler.

A run is a row keyed by (schedule, scheduled_for). The row is written before the run starts, and the same transaction
moves the schedule's cursor past that time, so a crash or a second scheduler can never start the same run twice.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

ACTIVE = ("starting", "running")
SUCCEEDED = "succeeded"
# Terminal states besides success: failed (the job failed or could not start), lost (its job vanished, e.g. the
# scheduler died before starting it), stopped (replaced by a newer run), skipped (forbid), missed (past deadline).
UNSUCCESSFUL = ("failed", "lost", "stopped", "skipped", "missed")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    schedule TEXT NOT NULL,
    scheduled_for TEXT NOT NULL,
    state TEXT NOT NULL,
    job_id TEXT NOT NULL,
    output TEXT,
    started_at TEXT,
    ended_at TEXT,
    succeeded INTEGER,
    failed INTEGER,
    skipped INTEGER,
    error TEXT,
    PRIMARY KEY (schedule, scheduled_for)
);
CREATE TABLE IF NOT EXISTS cursors (
    schedule TEXT PRIMARY KEY,
    scheduled_for TEXT NOT NULL
);
"""


def iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat()


def parse_iso(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


@dataclass(frozen=True)
class Run:
    schedule: str
    scheduled_for: datetime
    state: str
    job_id: str
    output: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    succeeded: int | None = None
    failed: int | None = None
    skipped: int | None = None
    error: str | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Run:
        values = dict(row)
        for key in ("scheduled_for", "started_at", "ended_at"):
            values[key] = parse_iso(values[key])
        return cls(**values)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


_COLUMNS = [f.name for f in fields(Run)]


class History:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit, with explicit BEGIN IMMEDIATE where several statements must land together.
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def cursor(self, schedule: str) -> datetime | None:
        row = self._db.execute("SELECT scheduled_for FROM cursors WHERE schedule = ?", (schedule,)).fetchone()
        return parse_iso(row[0]) if row else None

    def claim(self, run: Run) -> bool:
        """Record a run and move the cursor to its time, atomically; False when that time was already taken."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                current = self._db.execute(
                    "SELECT scheduled_for FROM cursors WHERE schedule = ?", (run.schedule,)
                ).fetchone()
                if current and parse_iso(current[0]) >= run.scheduled_for:
                    self._db.execute("ROLLBACK")
                    return False
                self._db.execute(
                    f"INSERT INTO runs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)})",
                    self._values(run),
                )
                self._db.execute(
                    "INSERT INTO cursors (schedule, scheduled_for) VALUES (?, ?) "
                    "ON CONFLICT(schedule) DO UPDATE SET scheduled_for = excluded.scheduled_for",
                    (run.schedule, iso(run.scheduled_for)),
                )
                self._db.execute("COMMIT")
                return True
            except sqlite3.IntegrityError:
                self._db.execute("ROLLBACK")
                return False
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def update(self, schedule: str, scheduled_for: datetime, **changes) -> None:
        unknown = set(changes) - set(_COLUMNS)
        assert not unknown, unknown
        values = [iso(v) if isinstance(v, datetime) else v for v in changes.values()]
        with self._lock:
            self._db.execute(
                f"UPDATE runs SET {', '.join(f'{k} = ?' for k in changes)} WHERE schedule = ? AND scheduled_for = ?",
                (*values, schedule, iso(scheduled_for)),
            )

    def get(self, schedule: str, scheduled_for: datetime) -> Run | None:
        row = self._db.execute(
            "SELECT * FROM runs WHERE schedule = ? AND scheduled_for = ?", (schedule, iso(scheduled_for))
        ).fetchone()
        return Run.from_row(row) if row else None

    def active(self, schedule: str | None = None) -> list[Run]:
        query = f"SELECT * FROM runs WHERE state IN ({', '.join('?' for _ in ACTIVE)})"
        params: tuple = ACTIVE
        if schedule is not None:
            query, params = query + " AND schedule = ?", (*ACTIVE, schedule)
        return [Run.from_row(r) for r in self._db.execute(query + " ORDER BY scheduled_for", params)]

    def runs(self, schedule: str, limit: int | None = None) -> list[Run]:
        """Newest first."""
        query = "SELECT * FROM runs WHERE schedule = ? ORDER BY scheduled_for DESC"
        rows = self._db.execute(query + (" LIMIT ?" if limit else ""), (schedule, limit) if limit else (schedule,))
        return [Run.from_row(r) for r in rows]

    def schedules(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT DISTINCT schedule FROM runs ORDER BY schedule")]

    def prune(self, schedule: str, keep_succeeded: int, keep_unsuccessful: int) -> list[Run]:
        """Drop the oldest finished runs beyond the limits (the cursor stays, so their times never rerun)."""
        dropped = []
        for states, keep in (((SUCCEEDED,), keep_succeeded), (UNSUCCESSFUL, keep_unsuccessful)):
            rows = self._db.execute(
                f"SELECT * FROM runs WHERE schedule = ? AND state IN ({', '.join('?' for _ in states)}) "
                "ORDER BY scheduled_for DESC LIMIT -1 OFFSET ?",
                (schedule, *states, keep),
            ).fetchall()
            dropped.extend(Run.from_row(r) for r in rows)
        with self._lock:
            for run in dropped:
                self._db.execute(
                    "DELETE FROM runs WHERE schedule = ? AND scheduled_for = ?", (run.schedule, iso(run.scheduled_for))
                )
        return dropped

    @staticmethod
    def _values(run: Run) -> tuple:
        return tuple(iso(v) if isinstance(v, datetime) else v for v in (getattr(run, c) for c in _COLUMNS))
