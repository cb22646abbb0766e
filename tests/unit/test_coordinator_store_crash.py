"""SIGKILL a process in the middle of SQLite writes: the file reopens whole, with no half-applied heartbeat."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.store_sqlite import SqliteStore

pytestmark = pytest.mark.timeout(60)

WRITER = """
import sys
from coordinator.state import Capacity, Heartbeat, MemberRecord, RoundRecord
from coordinator.store_sqlite import SqliteStore
from swarm.config import BaseModelRef, RoundSpec, split_even

store = SqliteStore(sys.argv[1])
spec = RoundSpec(round_id="r1", base=BaseModelRef(path="/m", num_layers=4), spans=split_even(4, 2))
store.create_round(RoundRecord.new(spec, 0.0))
peers = [f"p{i}" for i in range(4)]
for p in peers:
    store.put_member(MemberRecord("r1", p, 0, (), Capacity(), 0.0, 0.0, 0.0))
n = 0
while True:
    n += 1
    for p in peers:
        store.record_heartbeat("r1", p, Heartbeat(samples=n, tokens=10 * n, epoch=n // 10), float(n))
    if n in (50, 100):
        print(n, flush=True)
"""


def test_sigkill_mid_write_leaves_consistent_records(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite3"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert [proc.stdout.readline().strip() for _ in range(2)] == ["50", "100"]  # killed while it writes on
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL

    store = SqliteStore(db)
    members = {m.peer_id: m for m in store.list_members("r1")}
    contributions = {c.peer_id: c for c in store.list_contributions("r1")}
    assert sorted(members) == sorted(contributions) == ["p0", "p1", "p2", "p3"]
    for peer, m in members.items():
        # member counters and the contribution move in one transaction: they always agree
        assert (contributions[peer].samples, contributions[peer].tokens) == (m.session_samples, m.session_tokens)
        assert m.session_samples >= 100 and m.last_heartbeat == float(m.session_samples)
    # heartbeats go peer by peer, so at most one round of the loop is partly written
    assert max(m.session_samples for m in members.values()) - min(m.session_samples for m in members.values()) <= 1
    assert store._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store.close()
