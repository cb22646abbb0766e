"""SQLite :class:`~coordinator.state.CoordinatorStore`: one file, WAL mode, versioned schema.

Every public method runs in one ``BEGIN IMMEDIATE`` transaction, so a killed process leaves
either the whole write or none of it. ``synchronous=NORMAL`` in WAL mode survives a process
crash (SIGKILL); a power cut may lose the last commits but never corrupts the file.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from coordinator.state import (
    AdapterRecord,
    AlreadyExists,
    Capacity,
    Conflict,
    Contribution,
    CoordinatorStore,
    EvalReport,
    Heartbeat,
    JoinRejection,
    MemberRecord,
    MemberState,
    NotFound,
    RoundRecord,
    SpanStateUpload,
    StoreError,
    dump_tuple,
    load_tuple,
)
from swarm.proto import RoundState

#: Schema migrations: ``MIGRATIONS[v]`` takes a database from version ``v`` to ``v + 1``.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE rounds (round_id TEXT PRIMARY KEY, spec_json TEXT NOT NULL, state TEXT NOT NULL,
            created_at REAL NOT NULL, started_at REAL, ended_at REAL, parent_adapter TEXT NOT NULL)""",
        """CREATE TABLE members (round_id TEXT NOT NULL REFERENCES rounds(round_id), peer_id TEXT NOT NULL,
            span_index INTEGER NOT NULL, multiaddrs TEXT NOT NULL, memory_bytes INTEGER NOT NULL,
            device TEXT NOT NULL, capacity_throughput REAL NOT NULL, throughput REAL NOT NULL,
            joined_at REAL NOT NULL, last_heartbeat REAL NOT NULL, state TEXT NOT NULL,
            epoch INTEGER NOT NULL, loss REAL, session_samples INTEGER NOT NULL,
            session_tokens INTEGER NOT NULL, PRIMARY KEY (round_id, peer_id))""",
        """CREATE TABLE contributions (round_id TEXT NOT NULL REFERENCES rounds(round_id),
            peer_id TEXT NOT NULL, samples INTEGER NOT NULL, tokens INTEGER NOT NULL,
            PRIMARY KEY (round_id, peer_id))""",
        """CREATE TABLE span_states (id INTEGER PRIMARY KEY AUTOINCREMENT, round_id TEXT NOT NULL,
            peer_id TEXT NOT NULL, span_index INTEGER NOT NULL, epoch INTEGER NOT NULL, path TEXT NOT NULL,
            sha256 TEXT NOT NULL, size_bytes INTEGER NOT NULL, samples INTEGER NOT NULL,
            uploaded_at REAL NOT NULL, UNIQUE (round_id, peer_id, span_index, epoch))""",
        """CREATE TABLE eval_reports (id INTEGER PRIMARY KEY AUTOINCREMENT, round_id TEXT NOT NULL,
            peer_id TEXT NOT NULL, adapter_version TEXT NOT NULL, epoch INTEGER NOT NULL,
            eval_loss REAL NOT NULL, eval_tokens INTEGER NOT NULL, reported_at REAL NOT NULL)""",
        """CREATE TABLE adapters (version TEXT PRIMARY KEY, parents TEXT NOT NULL, round_id TEXT NOT NULL,
            path TEXT NOT NULL, sha256 TEXT NOT NULL, created_at REAL NOT NULL,
            eval_loss_before REAL, eval_loss_after REAL)""",
        """CREATE TABLE join_rejections (id INTEGER PRIMARY KEY AUTOINCREMENT, peer_id TEXT NOT NULL,
            round_id TEXT NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL, at REAL NOT NULL)""",
    ],
    ["ALTER TABLE rounds ADD COLUMN reason TEXT NOT NULL DEFAULT ''"],
    ["ALTER TABLE members ADD COLUMN credential_sha256 TEXT NOT NULL DEFAULT ''"],
    ["ALTER TABLE eval_reports ADD COLUMN candidate_sha256 TEXT NOT NULL DEFAULT ''"],
    [
        "ALTER TABLE members ADD COLUMN max_blocks INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE members ADD COLUMN quantize TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE members ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE members ADD COLUMN removed_reason TEXT NOT NULL DEFAULT ''",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)

_MEMBER_COLS = (
    "round_id, peer_id, span_index, multiaddrs, memory_bytes, device, capacity_throughput, throughput, "
    "joined_at, last_heartbeat, state, epoch, loss, session_samples, session_tokens, credential_sha256, "
    "max_blocks, quantize, pinned, removed_reason"
)

#: A re-join keeps the member's row (and so its place in listings); every other column is replaced.
_UPSERT_SET = ", ".join(f"{c} = excluded.{c}" for c in _MEMBER_COLS.split(", ")[2:])


class StoreVersionError(StoreError):
    """The database was written by a newer coordinator."""


def _round(row: Any) -> RoundRecord:
    return RoundRecord(row[0], row[1], RoundState(row[2]), row[3], row[4], row[5], row[6], row[7])


def _member(row: Any) -> MemberRecord:
    return MemberRecord(
        round_id=row[0],
        peer_id=row[1],
        span_index=row[2],
        multiaddrs=load_tuple(row[3]),
        capacity=Capacity(row[4], row[5], row[6], row[16], row[17]),
        throughput=row[7],
        joined_at=row[8],
        last_heartbeat=row[9],
        state=MemberState(row[10]),
        epoch=row[11],
        loss=row[12],
        session_samples=row[13],
        session_tokens=row[14],
        credential_sha256=row[15],
        pinned=bool(row[18]),
        removed_reason=row[19],
    )


def _adapter(row: Any) -> AdapterRecord:
    return AdapterRecord(row[0], load_tuple(row[1]), row[2], row[3], row[4], row[5], row[6], row[7])


class SqliteStore(CoordinatorStore):
    """All state in one SQLite file; safe to share between threads (one connection behind a lock)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def _migrate(self) -> None:
        with self._tx() as c:
            version = c.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreVersionError(
                    f"{self.path} has schema version {version} but this coordinator knows up to "
                    f"{SCHEMA_VERSION}: upgrade loraswarm or point --workdir at another directory"
                )
            for v in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[v]:
                    c.execute(statement)
            c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # --- rounds
    def create_round(self, record: RoundRecord) -> None:
        r = record
        try:
            with self._tx() as c:
                c.execute(
                    "INSERT INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (r.round_id, r.spec_json, r.state.value, r.created_at, r.started_at, r.ended_at,
                     r.parent_adapter, r.reason),
                )  # fmt: skip
        except sqlite3.IntegrityError as e:
            raise AlreadyExists(f"round {r.round_id!r} already exists") from e

    def get_round(self, round_id: str) -> RoundRecord | None:
        rows = self._query("SELECT * FROM rounds WHERE round_id = ?", (round_id,))
        return _round(rows[0]) if rows else None

    def list_rounds(self) -> list[RoundRecord]:
        return [_round(r) for r in self._query("SELECT * FROM rounds ORDER BY rowid")]

    def set_round_state(
        self,
        round_id: str,
        state: RoundState,
        *,
        expected: RoundState,
        started_at: float | None = None,
        ended_at: float | None = None,
        reason: str | None = None,
    ) -> RoundRecord:
        with self._tx() as c:
            row = c.execute("SELECT state FROM rounds WHERE round_id = ?", (round_id,)).fetchone()
            if row is None:
                raise NotFound(f"round {round_id!r} does not exist")
            if row[0] != expected.value:
                raise Conflict(f"round {round_id!r} is {row[0]}, expected {expected.value}")
            c.execute(
                "UPDATE rounds SET state = ?, started_at = COALESCE(?, started_at), "
                "ended_at = COALESCE(?, ended_at), reason = COALESCE(?, reason) WHERE round_id = ?",
                (state.value, started_at, ended_at, reason, round_id),
            )
            return _round(c.execute("SELECT * FROM rounds WHERE round_id = ?", (round_id,)).fetchone())

    # --- members
    def put_member(self, member: MemberRecord) -> None:
        m = member
        self._members_changed()
        with self._tx() as c:
            if c.execute("SELECT 1 FROM rounds WHERE round_id = ?", (m.round_id,)).fetchone() is None:
                raise NotFound(f"round {m.round_id!r} does not exist")
            c.execute(
                f"INSERT INTO members ({_MEMBER_COLS}) VALUES ({', '.join('?' * 20)}) "
                f"ON CONFLICT (round_id, peer_id) DO UPDATE SET {_UPSERT_SET}",
                (m.round_id, m.peer_id, m.span_index, dump_tuple(m.multiaddrs), m.capacity.memory_bytes,
                 m.capacity.device, m.capacity.throughput, m.throughput, m.joined_at, m.last_heartbeat,
                 m.state.value, m.epoch, m.loss, m.session_samples, m.session_tokens, m.credential_sha256,
                 m.capacity.max_blocks, m.capacity.quantize, int(m.pinned), m.removed_reason),
            )  # fmt: skip
            c.execute("INSERT OR IGNORE INTO contributions VALUES (?, ?, 0, 0)", (m.round_id, m.peer_id))
        self._members_changed()

    def get_member(self, round_id: str, peer_id: str) -> MemberRecord | None:
        rows = self._query(
            f"SELECT {_MEMBER_COLS} FROM members WHERE round_id = ? AND peer_id = ?", (round_id, peer_id)
        )
        return _member(rows[0]) if rows else None

    def list_members(self, round_id: str, state: MemberState | None = None) -> list[MemberRecord]:
        sql = f"SELECT {_MEMBER_COLS} FROM members WHERE round_id = ?"
        args: tuple[Any, ...] = (round_id,)
        if state is not None:
            sql, args = sql + " AND state = ?", (round_id, state.value)
        return [_member(r) for r in self._query(sql + " ORDER BY rowid", args)]

    def record_heartbeat(self, round_id: str, peer_id: str, beat: Heartbeat, now: float) -> MemberRecord:
        key = (round_id, peer_id)
        with self._tx() as c:
            row = c.execute(f"SELECT {_MEMBER_COLS} FROM members WHERE round_id = ? AND peer_id = ?", key).fetchone()
            if row is None:
                raise NotFound(f"peer {peer_id!r} is not a member of round {round_id!r}")
            m = _member(row)
            d_samples, d_tokens = beat.samples - m.session_samples, beat.tokens - m.session_tokens
            if d_samples < 0 or d_tokens < 0:
                raise Conflict(
                    f"progress went backwards: samples {m.session_samples} -> {beat.samples}, "
                    f"tokens {m.session_tokens} -> {beat.tokens}"
                )
            c.execute(
                "UPDATE members SET last_heartbeat = ?, epoch = MAX(epoch, ?), loss = COALESCE(?, loss), "
                "throughput = CASE WHEN ? > 0 THEN ? ELSE throughput END, session_samples = ?, "
                "session_tokens = ? WHERE round_id = ? AND peer_id = ?",
                (now, beat.epoch, beat.loss, beat.throughput, beat.throughput, beat.samples, beat.tokens, *key),
            )
            c.execute(
                "UPDATE contributions SET samples = samples + ?, tokens = tokens + ? "
                "WHERE round_id = ? AND peer_id = ?",
                (d_samples, d_tokens, *key),
            )
            row = c.execute(f"SELECT {_MEMBER_COLS} FROM members WHERE round_id = ? AND peer_id = ?", key)
            return _member(row.fetchone())

    def set_member_states(self, round_id: str, peer_ids: list[str], state: MemberState) -> None:
        self._members_changed()
        with self._tx() as c:
            c.executemany(
                "UPDATE members SET state = ? WHERE round_id = ? AND peer_id = ?",
                [(state.value, round_id, pid) for pid in peer_ids],
            )
        self._members_changed()

    def move_members(self, round_id: str, moves: dict[str, int]) -> None:
        self._members_changed()
        with self._tx() as c:
            c.executemany(
                "UPDATE members SET span_index = ?, epoch = 0 WHERE round_id = ? AND peer_id = ? AND span_index != ?",
                [(span, round_id, pid, span) for pid, span in moves.items()],
            )
        self._members_changed()

    def list_contributions(self, round_id: str) -> list[Contribution]:
        rows = self._query("SELECT * FROM contributions WHERE round_id = ? ORDER BY rowid", (round_id,))
        return [Contribution(*r) for r in rows]

    # --- uploads, evals
    def put_span_state(self, upload: SpanStateUpload) -> None:
        u = upload
        with self._tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO span_states (round_id, peer_id, span_index, epoch, path, sha256, "
                "size_bytes, samples, uploaded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (u.round_id, u.peer_id, u.span_index, u.epoch, u.path, u.sha256, u.size_bytes, u.samples,
                 u.uploaded_at),
            )  # fmt: skip

    def list_span_states(self, round_id: str) -> list[SpanStateUpload]:
        rows = self._query("SELECT * FROM span_states WHERE round_id = ? ORDER BY id", (round_id,))
        return [SpanStateUpload(*r[1:]) for r in rows]

    def add_eval_report(self, report: EvalReport) -> None:
        e = report
        with self._tx() as c:
            c.execute(
                "INSERT INTO eval_reports (round_id, peer_id, adapter_version, epoch, eval_loss, eval_tokens, "
                "reported_at, candidate_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    e.round_id,
                    e.peer_id,
                    e.adapter_version,
                    e.epoch,
                    e.eval_loss,
                    e.eval_tokens,
                    e.reported_at,
                    e.candidate_sha256,
                ),  # fmt: skip
            )

    def list_eval_reports(self, round_id: str | None = None) -> list[EvalReport]:
        if round_id is None:
            rows = self._query("SELECT * FROM eval_reports ORDER BY id")
        else:
            rows = self._query("SELECT * FROM eval_reports WHERE round_id = ? ORDER BY id", (round_id,))
        return [EvalReport(*r[1:]) for r in rows]

    def count_eval_reports(self, round_id: str, peer_id: str) -> int:
        rows = self._query("SELECT COUNT(*) FROM eval_reports WHERE round_id = ? AND peer_id = ?", (round_id, peer_id))
        return int(rows[0][0])

    def delete_eval_reports(self, round_id: str) -> int:
        with self._tx() as c:
            return c.execute("DELETE FROM eval_reports WHERE round_id = ?", (round_id,)).rowcount

    # --- adapters, rejections
    def add_adapter(self, record: AdapterRecord) -> None:
        a = record
        try:
            with self._tx() as c:
                c.execute(
                    "INSERT INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (a.version, dump_tuple(a.parents), a.round_id, a.path, a.sha256, a.created_at,
                     a.eval_loss_before, a.eval_loss_after),
                )  # fmt: skip
        except sqlite3.IntegrityError as e:
            raise AlreadyExists(f"adapter version {a.version!r} already exists") from e

    def get_adapter(self, version: str) -> AdapterRecord | None:
        rows = self._query("SELECT * FROM adapters WHERE version = ?", (version,))
        return _adapter(rows[0]) if rows else None

    def list_adapters(self) -> list[AdapterRecord]:
        return [_adapter(r) for r in self._query("SELECT * FROM adapters ORDER BY rowid")]

    def add_rejection(self, rejection: JoinRejection) -> None:
        j = rejection
        with self._tx() as c:
            c.execute(
                "INSERT INTO join_rejections (peer_id, round_id, reason, detail, at) VALUES (?, ?, ?, ?, ?)",
                (j.peer_id, j.round_id, j.reason, j.detail, j.at),
            )

    def list_rejections(self) -> list[JoinRejection]:
        return [JoinRejection(*r[1:]) for r in self._query("SELECT * FROM join_rejections ORDER BY id")]
