"""A replica that returns a wrong average for its part of a span's all-reduce (one of three; real hivemind
averaging, its averager process forked with a lying ``TensorPartReducer``: it returns -3x the true average).

Every replica finds the result inconsistent with what the group declared; each then asks every member to show
the gradient it brought (over the span transport), checks it against that member's declaration, and computes the
exact weighted average itself: the epoch is neither poisoned nor lost, and the three replicas agree bitwise. In the
group, a sender that lied to a reducer looks the same as a reducer that lied; so the members average again in
every pair, where each knows both gradients: the honest replicas name the liar, and neither names the other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from peer.inprocess import InProcessNode
from peer.server import SpanServer
from tests.integration.harness import in_process_server, tiny_spec, wait_for
from tests.integration.hostile_peer import lie_when_reducing
from tests.integration.test_hostile_replica import _all_reduce, _honest_means, serve

pytestmark = pytest.mark.integration
HOSTILE = 2


@pytest.fixture(scope="module")
def replicas(tiny_checkpoint: Callable[..., Path]) -> Iterator[list[SpanServer]]:
    ckpt = tiny_checkpoint("llama", layers=2)
    spec = tiny_spec(ckpt, "wrongavg", [0, 2])
    nodes: list[InProcessNode] = []
    for _ in range(3):
        nodes.append(InProcessNode.start("wrongavg", nodes[0].dht.get_visible_maddrs() if nodes else []))
    built = []
    for i, node in enumerate(nodes):
        honest = lie_when_reducing() if i == HOSTILE else None  # only this replica's averager (forked now) lies
        try:
            built.append(in_process_server(spec, spec.spans[0], node))
        finally:
            if honest is not None:
                from hivemind.averaging.partition import TensorPartReducer

                TensorPartReducer.accumulate_part = honest  # type: ignore[method-assign]
    servers = [s for s, _ in built]
    for server, announcer in built:
        server.group.averager.wait_until_ready()  # no epoch thread: the test drives the groups itself
        serve(server)
        announcer.start()
    try:
        wait_for(lambda: all(len(s.group.replica_epochs()) == 3 for s in servers), 30, "three replicas announced")
        yield servers
    finally:
        for server, announcer in built:
            announcer.stop(leave=False)
            server.shutdown()
        for node in nodes:
            node.dht.shutdown()


@pytest.mark.timeout(300)
def test_a_wrong_average_for_one_part_is_recomputed_and_its_reducer_named_in_pairs(replicas: list[SpanServer]) -> None:
    for epoch in (0, 1):
        means = _honest_means(replicas, 10 + epoch)
        before = [r.group.recomputed_epochs for r in replicas]
        results = _all_reduce(replicas, epoch, means, [None, None, None])
        expected = [sum(m[k] for m in means) / 3 for k in range(len(means[0]))]
        for i, r in enumerate(results):
            assert r is not None, f"replica {i} lost epoch {epoch} to the wrong part"
            assert max((a - b).abs().max().item() for a, b in zip(r, expected, strict=True)) < 1e-6
            assert replicas[i].group.recomputed_epochs == before[i] + 1, "the all-reduce's own result was not wrong"
            assert all(torch.equal(a, b) for a, b in zip(r, results[0], strict=True)), "replicas disagree"
        liar = replicas[HOSTILE].peer_id
        for i in (0, 1):  # the pair audits: each honest replica names the liar, and only the liar
            assert "pair average" in replicas[i].group.suspects.get(liar, ""), replicas[i].group.suspects
            assert set(replicas[i].group.suspects) == {liar}, replicas[i].group.suspects


@pytest.mark.timeout(120)
def test_a_replica_shows_only_what_it_kept_and_refuses_junk(replicas: list[SpanServer]) -> None:
    from peer.remote import RemoteCallError

    asker, shower = replicas[0], replicas[1]
    kept = sorted(e for e in range(100) if shower.group.shown(e) is not None)
    assert kept == [0, 1], kept  # its last two all-reduces (the test above)
    samples, tensors = asker.contribution_of(shower.peer_id, 1)
    held = shower.group.shown(1)
    assert held is not None and samples == held[0]
    assert all(torch.equal(a, b) for a, b in zip(tensors, held[1], strict=True))
    with pytest.raises(RemoteCallError, match="NotKeptError"):
        asker.contribution_of(shower.peer_id, 7)
    with pytest.raises(RemoteCallError, match="BadRequestError"):
        asker.contribution_of(shower.peer_id, "1")  # type: ignore[arg-type]
