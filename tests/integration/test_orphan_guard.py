"""A peer's p2pd and hivemind workers do not outlive its Python process, however that process ends."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.integration.harness import Peer, make_spec, save_spec, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def running(procs: list[psutil.Process]) -> list[str]:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{p.name()}({p.pid})")
        except psutil.NoSuchProcess:
            continue
    return alive


def test_sigkilled_peer_leaves_no_p2pd(demo_base: Path, demo_data: Path, tmp_path: Path) -> None:
    spec_path = save_spec(tmp_path, make_spec(demo_base, demo_data, "r-orphan", [0, 4]))
    peer = Peer(tmp_path, "victim", spec_path, ["--no-trainer"])
    try:
        peer.ready()
        children = descendants(peer.proc.pid)
        p2pd = [p for p in children if p.name() == "p2pd"]
        assert p2pd, f"no p2pd among the peer's descendants: {[p.name() for p in children]}"
        assert len(children) > len(p2pd) + 1  # hivemind's forked workers and the guard are there too

        peer.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: not running(children), timeout=5, what=f"the peer's leftovers to stop: {running(children)}")
        print(f"leftovers of the SIGKILLed peer stopped {time.monotonic() - killed:.2f} s after the kill")
    finally:
        peer.stop(timeout=5)  # reaps the killed process and SIGKILLs its group if anything survived
    assert peer.leftovers == []


def test_clean_stop_leaves_nothing(demo_base: Path, demo_data: Path, tmp_path: Path) -> None:
    spec_path = save_spec(tmp_path, make_spec(demo_base, demo_data, "r-clean", [0, 4]))
    peer = Peer(tmp_path, "clean", spec_path, ["--no-trainer"])
    try:
        peer.ready()
        children = descendants(peer.proc.pid)
    finally:
        code = peer.stop()
    assert code == 0 and peer.leftovers == []
    assert not running(children)
