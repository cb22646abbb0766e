"""ReplicaGroup repair and catch-up over announced epochs (real hivemind, two replicas in one process).

After a failed all-reduce, a replica copies one that reached the next epoch; when every replica's all-reduce failed,
every replica skips the epoch's update alike (no replica's local gradients are trusted; no settle window);
a replica behind downloads the state first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from peer.inprocess import InProcessNode
from peer.server import SpanServer
from peer.transport import SpanTransport
from tests.integration.harness import in_process_server, tiny_spec, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def replicas(tiny_checkpoint: Callable[..., Path]) -> Iterator[list[SpanServer]]:
    ckpt = tiny_checkpoint("llama", layers=2)
    spec = tiny_spec(ckpt, "repair", [0, 2])
    first = InProcessNode.start("repair")
    second = InProcessNode.start("repair", first.dht.get_visible_maddrs())
    built = [in_process_server(spec, spec.spans[0], node) for node in (first, second)]
    servers = [s for s, _ in built]
    for server, announcer in built:
        server.group.averager.wait_until_ready()  # no epoch thread: the tests drive the group themselves
        server.transport = SpanTransport(server)  # serves rpc_state to the replica that catches up
        server.transport.start()
        announcer.start()
    try:
        wait_for(lambda: all(len(s.group.replica_epochs()) == 2 for s in servers), 30, "both replicas announced")
        yield servers
    finally:
        for server, announcer in built:
            announcer.stop(leave=False)
            server.shutdown()
        for node in (first, second):
            node.dht.shutdown()


def _local_gradients(i: int, server: SpanServer) -> list[torch.Tensor]:
    return [torch.full_like(p, 0.01 * (i + 1)) for p in server.params]


def _weights(server: SpanServer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in server.lora_state().items()}


@pytest.mark.timeout(120)
def test_when_every_all_reduce_failed_every_replica_skips_the_update_alike(replicas: list[SpanServer]) -> None:
    before = [_weights(s) for s in replicas]
    threads = [
        threading.Thread(target=s.group.repair, args=(0, _local_gradients(i, s))) for i, s in enumerate(replicas)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "repair did not finish"
    after = [_weights(s) for s in replicas]
    # Each replica skips the update, or (when the other skipped first and announced epoch 1 while it was still
    # deciding) copies that replica's state: the same unchanged parameters either way (checked below).
    assert [s.epoch for s in replicas] == [1, 1] and sum(s.group.skipped_epochs for s in replicas) >= 1
    assert all(s.group.version % 2 == 0 for s in replicas), "parameters look mid-change: requests would be refused"
    # nobody's local gradients were applied (a hostile replica's would be copied by all): the state is unchanged
    for i in range(2):
        assert all(torch.equal(after[i][k], before[i][k]) for k in after[i]), "a replica stepped alone"
    assert all(torch.equal(after[0][k], after[1][k]) for k in after[0]), "replicas differ after the repair"


@pytest.mark.timeout(120)
def test_a_replica_behind_downloads_the_state_of_one_ahead(replicas: list[SpanServer]) -> None:
    ahead, behind = replicas
    ahead.group.apply(0, _local_gradients(0, ahead), "test step")
    ahead.group.apply(1, _local_gradients(0, ahead), "test step")
    wait_for(lambda: behind.group.replica_epochs().get(ahead.peer_id) == 2, 20, "the new epoch to be announced")
    assert behind.group.catch_up()
    assert behind.epoch == 2
    a, b = _weights(ahead), _weights(behind)
    assert all(torch.equal(a[k], b[k]) for k in a)
    opt_a, opt_b = ahead.group.optimizer.state_dict()["state"], behind.group.optimizer.state_dict()["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)


@pytest.mark.timeout(120)
def test_a_state_that_is_not_finite_or_from_a_suspect_is_not_taken(replicas: list[SpanServer]) -> None:
    ahead, behind = replicas
    ahead.group.apply(0, _local_gradients(0, ahead), "test step")
    wait_for(lambda: behind.group.replica_epochs().get(ahead.peer_id) == 1, 20, "the new epoch to be announced")
    before = _weights(behind)
    honest = ahead.group.state
    ahead.group.state = lambda: (honest()[0], [torch.full_like(t, float("nan")) for t in honest()[1]])  # type: ignore[method-assign]
    try:
        assert not behind.group.catch_up()
        assert "not finite" in behind.group.suspects[ahead.peer_id]
        ahead.group.state = honest  # type: ignore[method-assign]
        assert not behind.group.catch_up(), "a replica caught sending a bad state was asked again"
    finally:
        ahead.group.state = honest  # type: ignore[method-assign]
    assert behind.epoch == 0
    after = _weights(behind)
    assert all(torch.equal(before[k], after[k]) for k in before)
    behind.group.suspects.clear()
    assert behind.group.catch_up() and behind.epoch == 1


@pytest.mark.timeout(120)
def test_a_replica_whose_all_reduce_failed_copies_one_whose_all_reduce_succeeded(replicas: list[SpanServer]) -> None:
    """hivemind can end one all-reduce with every part on one side and a missing part on the other ("received
    75% results"): the side that failed must take the other's full average, even with the smaller peer id."""
    failed_side = min(range(2), key=lambda i: replicas[i].peer_id)
    failed, succeeded = replicas[failed_side], replicas[1 - failed_side]
    repair = threading.Thread(target=failed.group.repair, args=(0, _local_gradients(0, failed)))
    repair.start()
    wait_for(lambda: succeeded.group.replica_failures().get(failed.peer_id) == 0, 20, "the failure to be announced")
    assert repair.is_alive() and failed.epoch == 0, "stepped alone while the other replica had not answered"
    succeeded.group.apply(0, _local_gradients(1, succeeded), "test: the full average")
    repair.join(timeout=60)
    assert not repair.is_alive() and failed.epoch == 1
    a, b = _weights(failed), _weights(succeeded)
    assert all(torch.equal(a[k], b[k]) for k in a), "the failed replica did not take the full average"


@pytest.mark.timeout(120)
def test_a_replica_that_stopped_answering_does_not_hold_the_all_reduce(replicas: list[SpanServer]) -> None:
    """A killed replica's announcement outlives it; the survivor must not wait hivemind's averaging timeout (30 s)
    for it: it asks the replica (rpc_info), finds it gone, abandons the all-reduce and steps alone."""
    from swarm.steps import StepContents

    survivor, dead = replicas
    dead.transport.shutdown()  # no longer answers; its record stays announced and it never joins the all-reduce
    dead.group.averager.shutdown()
    contents = StepContents(0, frozenset({("trainer", 0)}), 2)
    assert survivor.group.replica_epochs().get(dead.peer_id) == 0
    started = time.monotonic()
    survivor.group.end_epoch(contents)
    took = time.monotonic() - started
    assert survivor.epoch == 1 and dead.peer_id in survivor.group.gone
    timeout = survivor.spec.optimizer.averaging_timeout
    assert took < timeout / 3, f"the survivor waited {took:.1f} s (averaging timeout {timeout} s)"
