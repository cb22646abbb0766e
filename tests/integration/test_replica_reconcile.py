"""After a failed all-reduce, live replicas of a span copy one replica's state (real hivemind, in one process).

A failed all-reduce is rare once every replica joins every epoch; these tests put two replicas in the state it
leaves behind (same epoch, different LoRA weights) and run the repair on both at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import hivemind
import pytest
import torch
from hivemind.utils.crypto import RSAPrivateKey

from peer.announce import Announcer, record_validators
from peer.server import SpanServer
from swarm.lora import lora_parameters
from tests.integration.harness import one_span_spec, wait_for

pytestmark = pytest.mark.integration
LOCAL = ["/ip4/127.0.0.1/tcp/0"]


@pytest.fixture
def replicas(tiny_checkpoint: Callable[..., Path]) -> Iterator[list[SpanServer]]:
    ckpt = tiny_checkpoint("llama", layers=2)
    spec = one_span_spec(ckpt, "repair", layers=2)
    # two peers in one process: each signs its DHT records with its own key (a real peer uses its process's key)
    keys = [RSAPrivateKey(), RSAPrivateKey()]
    first = hivemind.DHT(start=True, host_maddrs=LOCAL, record_validators=record_validators("repair", keys[0]))
    second = hivemind.DHT(
        start=True,
        host_maddrs=LOCAL,
        initial_peers=first.get_visible_maddrs(),
        record_validators=record_validators("repair", keys[1]),
    )
    servers = [SpanServer(spec, spec.spans[0], dht) for dht in (first, second)]
    announcers = []
    for server, key in zip(servers, keys, strict=True):
        server.start(catch_up=False)
        announcer = Announcer(server.dht, "repair", partial(server.announcement, 1.0), period=1.0, private_key=key)
        announcer.start()
        announcers.append(announcer)
    try:
        wait_for(lambda: all(s.other_replicas() == 1 for s in servers), 30, "both replicas to see each other")
        yield servers
    finally:
        for announcer in announcers:
            announcer.stop(leave=False)
        for server in servers:
            server.shutdown()


def _diverge(servers: list[SpanServer], epoch: int) -> None:
    """Put both replicas at ``epoch`` with different LoRA weights, as two local-gradient updates would."""
    for i, server in enumerate(servers):
        with server.lock, torch.no_grad():
            # hivemind's optimizer works on its own copy of the parameters and writes them back after each step
            owned = [p for group in server.optimizer.state_averager.optimizer.param_groups for p in group["params"]]
            for param, copy in zip(lora_parameters(server.module).values(), owned, strict=True):
                param.add_(0.01 * (i + 1))
                copy.copy_(param)
            server.optimizer.state_averager.local_epoch = epoch
            server.optimizer.set_sharing_priority(float(epoch))


def _weights(server: SpanServer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in server.lora_state().items()}


def _run_together(*calls: Callable[[], None]) -> None:
    threads = [threading.Thread(target=call) for call in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "repair did not finish"


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(120)
def test_both_failed_the_replica_with_the_larger_peer_id_copies_the_other(replicas: list[SpanServer]) -> None:
    _diverge(replicas, epoch=3)
    before = [_weights(s) for s in replicas]
    assert not _same(*before)

    _run_together(*(s._reconcile for s in replicas))

    after = [_weights(s) for s in replicas]
    keeper = min(range(2), key=lambda i: replicas[i].dht.peer_id.to_bytes())
    assert _same(after[0], after[1]), "replicas still differ after the repair"
    assert _same(after[keeper], before[keeper]), "the replica with the smaller peer id should keep its state"
    assert [s.epoch for s in replicas] == [3, 3]


@pytest.mark.timeout(120)
def test_a_replica_that_averaged_is_the_one_copied(replicas: list[SpanServer]) -> None:
    _diverge(replicas, epoch=2)
    before = [_weights(s) for s in replicas]
    # The replica with the smaller peer id fell back; the other one averaged (keeps priority == epoch).
    failed = min(range(2), key=lambda i: replicas[i].dht.peer_id.to_bytes())
    ok = 1 - failed

    _run_together(replicas[failed]._reconcile)

    after = [_weights(s) for s in replicas]
    assert _same(after[failed], before[ok]), "the failed replica should copy the one that averaged"
    assert _same(after[ok], before[ok])
