"""A peer's p2pd and hivemind workers do not outlive its Python process, however that process ends."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest

from peer.orphan_guard import PERIOD
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

        # the guard records descendants every PERIOD: one started less than a period before the kill (the span's
        # averager starts shortly before "ready") is not known to it yet, so give it a few periods first
        time.sleep(3 * PERIOD)
        peer.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: not running(children), timeout=5, what=f"the peer's leftovers to stop: {running(children)}")
        print(f"leftovers of the SIGKILLed peer stopped {time.monotonic() - killed:.2f} s after the kill")
    finally:
        peer.stop(timeout=5)  # reaps the killed process and SIGKILLs its group if anything survived
    assert peer.leftovers == []


def test_calls_to_a_killed_peer_fail_fast(demo_base: Path, demo_data: Path, tmp_path: Path) -> None:
    """With its p2pd gone, a call to a SIGKILLed span server fails at once instead of waiting for the timeout.

    (A lingering p2pd accepts the stream and nothing ever answers: the caller waited its full request timeout.)
    """
    import hivemind
    import torch
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

    from peer.remote import RemoteCallError, RemoteSpan
    from peer.server import expert_uid

    spec = make_spec(demo_base, demo_data, "r-dead", [0, 4])
    peer = Peer(tmp_path, "server", save_spec(tmp_path, spec), ["--no-trainer"])
    client = None
    try:
        ready = peer.ready()
        client = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=ready["maddrs"])
        p2p = RemoteExpertWorker.run_coroutine(client.replicate_p2p())
        remote = RemoteSpan(p2p, ready["peer_id"], expert_uid(spec.round_id, spec.spans[0]), timeout=30)
        hidden = torch.randn(1, spec.data.seq_len, 64)
        assert remote.forward(0, ("trainer", 0), hidden).shape == hidden.shape  # alive: answers

        p2pd = [p for p in descendants(peer.proc.pid) if p.name() == "p2pd"]
        peer.proc.send_signal(signal.SIGKILL)
        wait_for(lambda: not running(p2pd), 5, "the killed peer's p2pd to stop")
        started = time.monotonic()
        with pytest.raises(RemoteCallError):
            remote.forward(0, ("trainer", 1), hidden)
        failed_after = time.monotonic() - started
        print(f"a call to the killed peer failed after {failed_after:.2f} s (request timeout 30 s)")
        assert failed_after < 5
    finally:
        if client is not None:
            client.shutdown()
        peer.stop(timeout=5)


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
