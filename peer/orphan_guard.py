"""Nothing a peer started outlives it: a tiny guard process stops the peer's leftovers when the peer dies.

When a peer's Python process is killed (SIGKILL, OOM killer, a crash in native code), the processes it started
do not die with it: hivemind's forked workers (DHT, TaskPools, connection handler, averagers) and the DHT's
``p2pd`` are re-parented and keep running; the p2pd keeps the peer's libp2p identity and address alive, so other
peers still reach "it" and trainers wait for a full request timeout before failing over.

hivemind starts p2pd itself (``asyncio.create_subprocess_exec`` in ``hivemind/p2p/p2p_daemon.py``) with no hook
for a ``preexec_fn``, so ``PR_SET_PDEATHSIG`` cannot be set on it, and it is forked from the DHT's process,
not from ours. Instead, :func:`start_orphan_guard` starts this file as a separate small process (stdlib +
psutil). It records the peer's descendants (pid and start time) every ``period`` seconds; when it is re-parented
(its parent, the peer, is gone, however it died) it sends SIGTERM to every recorded process still running with
the same start time, then SIGKILL after ``grace`` seconds, and exits. It ignores SIGINT/SIGTERM, so a Ctrl-C to
the terminal's process group does not stop it before it has cleaned up; after a normal shutdown it finds nothing
left and exits within ``period``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PERIOD = 0.25  # seconds between checks (and descendant snapshots)
GRACE = 1.0  # seconds between SIGTERM and SIGKILL
SETTLE = 0.5  # seconds the leftovers of a peer that exited normally get to finish by themselves
_started: list[subprocess.Popen[bytes]] = []  # referenced for the life of the process


def start_orphan_guard(pid: int | None = None) -> subprocess.Popen[bytes]:
    """Start the guard of process ``pid`` (default: this process), which must be the guard's parent."""
    pid = os.getpid() if pid is None else pid
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), str(pid)], stdin=subprocess.DEVNULL, close_fds=True
    )
    _started.append(proc)
    return proc


def _snapshot(parent: int) -> dict[int, float]:
    import psutil

    try:
        found = psutil.Process(parent).children(recursive=True)
    except psutil.Error:
        return {}
    out = {}
    for child in found:
        try:
            out[child.pid] = child.create_time()
        except psutil.Error:
            continue
    out.pop(os.getpid(), None)
    return out


def _still_same(pid: int, created: float) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop_leftovers(tracked: dict[int, float], grace: float = GRACE, settle: float = SETTLE) -> list[int]:
    """SIGTERM the ``tracked`` processes still running (same pid and start time) after ``settle`` seconds, then
    SIGKILL those still running ``grace`` seconds later; returns the pids it signalled."""
    deadline = time.monotonic() + settle
    while any(_still_same(pid, created) for pid, created in tracked.items()) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = [pid for pid, created in tracked.items() if _still_same(pid, created)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + grace
        while sig == signal.SIGTERM and time.monotonic() < deadline:
            if not any(_still_same(pid, tracked[pid]) for pid in alive):
                return alive
            time.sleep(0.05)
    return alive


def guard(parent: int, period: float = PERIOD) -> None:
    """Run until ``parent`` is gone, then stop what it left behind."""
    tracked: dict[int, float] = {}
    while os.getppid() == parent:
        tracked.update(_snapshot(parent))
        tracked = {pid: created for pid, created in tracked.items() if _still_same(pid, created)}
        time.sleep(period)
    stopped = stop_leftovers(tracked)
    if stopped:
        print(f"orphan guard: peer process {parent} is gone; stopped its leftover processes {stopped}", file=sys.stderr)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    guard(int(sys.argv[1]))
