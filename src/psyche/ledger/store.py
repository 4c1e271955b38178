"""SQLite persistence for the coordinator server.

Every accepted instruction and the state it produced are written in one
transaction, so a server killed at any moment restarts at the last applied
instruction: nothing is lost and nothing is applied twice. The instruction log
(signer, encoded instruction, ``now``, ``seed``) is kept whole, so anyone given
the database can replay the run and check the state digest.

Tables:
    runs          run_id, config (JSON), authority, genesis (initial state), created
    instructions  run_id, seq, signer, body, now, seed        (the replayable log)
    snapshots     run_id, seq, state, digest                  (latest state only)
    nonces        run_id, signer, nonce                       (replay protection)
    step_times    run_id, step, started, ended                (for tokens/s)
    client_reports run_id, signer, step, report (JSON), received
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    authority BLOB NOT NULL,
    genesis BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS instructions (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    signer BLOB NOT NULL,
    body BLOB NOT NULL,
    now INTEGER NOT NULL,
    seed BLOB NOT NULL,
    PRIMARY KEY (run_id, seq)
);
CREATE TABLE IF NOT EXISTS snapshots (
    run_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    state BLOB NOT NULL,
    digest TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS nonces (
    run_id TEXT NOT NULL,
    signer BLOB NOT NULL,
    nonce INTEGER NOT NULL,
    PRIMARY KEY (run_id, signer)
);
CREATE TABLE IF NOT EXISTS step_times (
    run_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    started REAL NOT NULL,
    ended REAL,
    PRIMARY KEY (run_id, step)
);
CREATE TABLE IF NOT EXISTS client_reports (
    run_id TEXT NOT NULL,
    signer BLOB NOT NULL,
    step INTEGER NOT NULL,
    report TEXT NOT NULL,
    received REAL NOT NULL,
    PRIMARY KEY (run_id, signer, step)
);
-- The status reads reports by step (recent steps, or the steps that changed).
CREATE INDEX IF NOT EXISTS client_reports_by_step ON client_reports (run_id, step);
"""


@dataclass(frozen=True)
class StoredRun:
    """A run as the database holds it: its config, authority and latest snapshot."""

    run_id: str
    config: dict
    authority: bytes
    seq: int
    state: bytes


class Store:
    """The server's database. Thread-safe; every write is one SQLite transaction."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        # One connection guarded by a lock: the server's writes are tiny and serial,
        # and WAL keeps a reader (e.g. a backup or `sqlite3` shell) from blocking us.
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL, not FULL: in WAL mode a commit then waits for no fsync (FULL's cost 3 ms of every
        # instruction and report here, most of a busy server's time). What a commit wrote survives
        # the server process crashing or being killed; only a power cut or an OS crash can lose the
        # last moments, and the database stays consistent even then (SQLite's WAL guarantee).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(step_times)")}
        if "ended" not in columns:  # a database written before steps recorded their end
            self._db.execute("ALTER TABLE step_times ADD COLUMN ended REAL")
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    # -- runs ---------------------------------------------------------------

    def create_run(self, run_id: str, config: dict, authority: bytes, state: bytes, digest: str) -> None:
        """Record a new run with its initial state (seq 0)."""
        with self._lock, self._tx():
            self._db.execute(
                "INSERT INTO runs (run_id, config, authority, genesis, created) VALUES (?, ?, ?, ?, ?)",
                (run_id, json.dumps(config, sort_keys=True), authority, state, time.time()),
            )
            self._db.execute(
                "INSERT INTO snapshots (run_id, seq, state, digest) VALUES (?, 0, ?, ?)",
                (run_id, state, digest),
            )

    def runs(self) -> list[StoredRun]:
        """Every run with its latest snapshot (its genesis state, seq 0, if it has none)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT r.run_id, r.config, r.authority, s.seq, COALESCE(s.state, r.genesis) FROM runs r "
                "LEFT JOIN snapshots s ON s.run_id = r.run_id ORDER BY r.created"
            ).fetchall()
        return [StoredRun(r[0], json.loads(r[1]), bytes(r[2]), r[3] or 0, r[4]) for r in rows]

    # -- the log ------------------------------------------------------------

    def append(
        self,
        run_id: str,
        seq: int,
        *,
        signer: bytes,
        body: bytes,
        now: int,
        seed: bytes,
        state: bytes,
        digest: str,
        nonce: int | None = None,
        step_started: tuple[int, float] | None = None,
        step_ended: tuple[int, float] | None = None,
    ) -> None:
        """Append one applied instruction and the state it produced, atomically.

        ``nonce`` (if given) becomes the signer's latest accepted nonce;
        ``step_started`` / ``step_ended`` record when a step's round began / ended.
        """
        with self._lock, self._tx():
            self._db.execute(
                "INSERT INTO instructions (run_id, seq, signer, body, now, seed) VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, seq, signer, body, now, seed),
            )
            self._db.execute(
                "UPDATE snapshots SET seq = ?, state = ?, digest = ? WHERE run_id = ?",
                (seq, state, digest, run_id),
            )
            if nonce is not None:
                self._db.execute(
                    "INSERT INTO nonces (run_id, signer, nonce) VALUES (?, ?, ?) "
                    "ON CONFLICT (run_id, signer) DO UPDATE SET nonce = excluded.nonce",
                    (run_id, signer, nonce),
                )
            if step_started is not None:
                self._db.execute(
                    "INSERT OR IGNORE INTO step_times (run_id, step, started) VALUES (?, ?, ?)",
                    (run_id, step_started[0], step_started[1]),
                )
            if step_ended is not None:
                self._db.execute(
                    "UPDATE step_times SET ended = ? WHERE run_id = ? AND step = ? AND ended IS NULL",
                    (step_ended[1], run_id, step_ended[0]),
                )

    def genesis(self, run_id: str) -> bytes:
        """The run's initial state, from which the log replays."""
        with self._lock:
            row = self._db.execute("SELECT genesis FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise KeyError(run_id)
        return bytes(row[0])

    def log(self, run_id: str) -> list[tuple[int, bytes, bytes, int, bytes]]:
        """The run's whole instruction log: (seq, signer, body, now, seed) in order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, signer, body, now, seed FROM instructions WHERE run_id = ? ORDER BY seq",
                (run_id,),
            ).fetchall()
        return [(r[0], bytes(r[1]), bytes(r[2]), r[3], bytes(r[4])) for r in rows]

    def last_nonce(self, run_id: str, signer: bytes) -> int:
        """The highest nonce accepted from ``signer`` (-1 if none)."""
        with self._lock:
            row = self._db.execute(
                "SELECT nonce FROM nonces WHERE run_id = ? AND signer = ?", (run_id, signer)
            ).fetchone()
        return row[0] if row else -1

    def record_nonce(self, run_id: str, signer: bytes, nonce: int) -> None:
        """Remember ``nonce`` as the signer's latest (for requests that append nothing)."""
        with self._lock, self._tx():
            self._db.execute(
                "INSERT INTO nonces (run_id, signer, nonce) VALUES (?, ?, ?) "
                "ON CONFLICT (run_id, signer) DO UPDATE SET nonce = excluded.nonce",
                (run_id, signer, nonce),
            )

    # -- metrics ------------------------------------------------------------

    def step_times(self, run_id: str, since_step: int = 0) -> dict[int, tuple[float, float | None]]:
        """When each step from ``since_step`` on started and ended (server clock, unix seconds; None: not yet)."""
        with self._lock:
            rows = self._db.execute("SELECT step, started, ended FROM step_times WHERE run_id = ? AND step >= ?",
                                    (run_id, since_step)).fetchall()
        return {r[0]: (r[1], r[2]) for r in rows}

    def add_report(self, run_id: str, signer: bytes, step: int, report: dict, nonce: int) -> float:
        """Store one client's metrics report for a step (a later one for the same step replaces it);
        returns the time it is recorded as received."""
        received = time.time()
        with self._lock, self._tx():
            self._db.execute(
                "INSERT OR REPLACE INTO client_reports (run_id, signer, step, report, received) VALUES (?, ?, ?, ?, ?)",
                (run_id, signer, step, json.dumps(report), received),
            )
            self._db.execute(
                "INSERT INTO nonces (run_id, signer, nonce) VALUES (?, ?, ?) "
                "ON CONFLICT (run_id, signer) DO UPDATE SET nonce = excluded.nonce",
                (run_id, signer, nonce),
            )
        return received

    def reports(self, run_id: str, since_step: int = 0,
                steps: Collection[int] | None = None) -> list[tuple[bytes, int, dict, float]]:
        """Client reports from ``since_step`` on (of ``steps`` only, if given): (signer, step, report,
        received), by step."""
        query = "SELECT signer, step, report, received FROM client_reports WHERE run_id = ? AND step >= ?"
        args: list[Any] = [run_id, since_step]
        if steps is not None:
            chosen = sorted(steps)
            query += f" AND step IN ({', '.join('?' * len(chosen))})"
            args += chosen
        with self._lock:
            rows = self._db.execute(query + " ORDER BY step", args).fetchall()
        return [(bytes(r[0]), r[1], json.loads(r[2]), r[3]) for r in rows]

    # -- helpers ------------------------------------------------------------

    class _Tx:
        def __init__(self, db: sqlite3.Connection):
            self.db = db

        def __enter__(self):
            self.db.execute("BEGIN IMMEDIATE")

        def __exit__(self, exc_type, exc, tb):
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")
            return False

    def _tx(self) -> Store._Tx:
        return Store._Tx(self._db)
