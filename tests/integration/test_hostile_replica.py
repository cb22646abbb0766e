"""A hostile replica in a span's all-reduce (one of three, real hivemind averaging in one process).

The honest replicas must never apply a poisoned average: one that declares an inflated or sign-flipped gradient
is named; one that sends other gradients than it declares (larger, NaN, or flipped under an honest sketch) makes the
result inconsistent, and when asked to show what it brought (over the span transport) it shows what it sent, which
is not what it declared: named, refused. An honest group's result is the exact weighted average.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from peer.inprocess import InProcessNode
from peer.server import SpanServer
from swarm.sanity import global_norm, sketch, sketch_mismatch, sketch_seed
from swarm.steps import StepContents
from tests.integration.harness import in_process_server, tiny_spec, wait_for

pytestmark = pytest.mark.integration
SAMPLES = 8


@pytest.fixture(scope="module")
def replicas(tiny_checkpoint: Callable[..., Path]) -> Iterator[list[SpanServer]]:
    ckpt = tiny_checkpoint("llama", layers=2)
    spec = tiny_spec(ckpt, "hostile", [0, 2])
    nodes: list[InProcessNode] = []
    for _ in range(3):
        nodes.append(InProcessNode.start("hostile", nodes[0].dht.get_visible_maddrs() if nodes else []))
    dhts = [n.dht for n in nodes]
    built = [in_process_server(spec, spec.spans[0], node) for node in nodes]
    servers = [s for s, _ in built]
    for server, announcer in built:
        server.group.averager.wait_until_ready()  # no epoch thread: the test drives the groups itself
        serve(server)  # the transport: replicas show each other what they brought to an inconsistent epoch
        announcer.start()
    # The hostile replica (index 2 in the tests) runs this code, but does not ask the others to show their gradients
    # after an inconsistent result: it would recompute its own poisoned average and then wait for pairs that the
    # honest replicas, having named it, do not join.
    servers[2].group.contribution = _asks_nobody
    try:
        wait_for(lambda: all(len(s.group.replica_epochs()) == 3 for s in servers), 30, "three replicas announced")
        yield servers
    finally:
        for server, announcer in built:
            announcer.stop(leave=False)
            server.shutdown()
        for dht in dhts:
            dht.shutdown()


def _asks_nobody(peer_id: str, epoch: int) -> tuple[int, list[torch.Tensor]]:
    raise ConnectionError("the hostile replica does not ask the others")


def serve(server: SpanServer) -> None:
    """Start the span transport of a server whose epoch thread does not run."""
    from peer.transport import SpanTransport

    server.transport = SpanTransport(server)
    server.transport.start()


def _all_reduce(
    servers: list[SpanServer],
    epoch: int,
    means: list[list[torch.Tensor]],
    declared: list[float | None],
    sketched: dict[int, list[torch.Tensor]] | None = None,
) -> list[list[torch.Tensor] | None]:
    """Run one all-reduce on all three replicas at once; ``declared`` overrides the norm a replica announces and
    ``sketched`` (replica -> tensors) what its declared sketch is of (a hostile replica: the same protocol, but
    what it says of its gradient is not what it sends)."""
    import peer.replica_group as rg

    contents = StepContents(epoch, frozenset({("t", 0), ("t", 1), ("t", 2)}), 3 * SAMPLES)
    lies = {id(m): d for m, d in zip(means, declared, strict=True) if d is not None}
    aliases = {id(means[i]): other for i, other in (sketched or {}).items()}
    results: list[list[torch.Tensor] | None] = [None] * 3

    def run(i: int) -> None:
        results[i] = servers[i].group.all_reduce(epoch, means[i], SAMPLES, contents)

    original, original_sketch = rg.global_norm, rg.sketch
    rg.global_norm = lambda tensors: lies.get(id(tensors)) or original(tensors)  # type: ignore[assignment]
    rg.sketch = lambda tensors, seed: original_sketch(aliases.get(id(tensors), tensors), seed)  # type: ignore[assignment]
    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
    finally:
        rg.global_norm, rg.sketch = original, original_sketch
    assert not any(t.is_alive() for t in threads), "an all-reduce did not finish"
    return results


def _honest_means(servers: list[SpanServer], seed: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(p.shape, generator=g) * 0.01 for p in servers[0].params]
    return [[b + 0.002 * torch.randn(b.shape, generator=g) for b in base] for _ in servers]


@pytest.mark.timeout(300)
def test_the_honest_replicas_never_apply_a_poisoned_average(replicas: list[SpanServer]) -> None:
    hostile = 2
    # epoch 0: an honest group gets the exact average
    means = _honest_means(replicas, 0)
    results = _all_reduce(replicas, 0, means, [None, None, None])
    expected = [sum(m[k] for m in means) / 3 for k in range(len(means[0]))]
    for r in results:
        assert r is not None
        assert max((a - b).abs().max().item() for a, b in zip(r, expected, strict=True)) < 1e-6

    # epoch 1: x100 gradients, declared as they are: refused and the sender is named
    means = _honest_means(replicas, 1)
    means[hostile] = [100 * t for t in means[hostile]]
    results = _all_reduce(replicas, 1, means, [None, None, None])
    for i in (0, 1):
        assert results[i] is None, "an honest replica accepted an average poisoned by x100 gradients"
        assert replicas[hostile].peer_id in replicas[i].group.suspects
        assert replicas[i].peer_id not in replicas[1 - i].group.suspects

    # epoch 2: x100 gradients under an honest-looking declared norm: the result is inconsistent; asked, the sender
    # shows what it sent, not what it declared: named, refused
    for r in replicas:
        r.group.suspects.clear()
    means = _honest_means(replicas, 2)
    honest_norm = global_norm(means[hostile])
    means[hostile] = [100 * t for t in means[hostile]]
    before = [r.group.inconsistent_epochs for r in replicas]
    results = _all_reduce(replicas, 2, means, [None, None, honest_norm])
    for i in (0, 1):
        assert results[i] is None, "an honest replica accepted gradients larger than their sender declared"
        assert replicas[i].group.inconsistent_epochs == before[i] + 1
        assert "showed a gradient of norm" in replicas[i].group.suspects.get(replicas[hostile].peer_id, "")
        assert replicas[1 - i].peer_id not in replicas[i].group.suspects

    # epoch 3: NaN gradients, declared as they are: refused, named for the norm it declared
    for r in replicas:
        r.group.suspects.clear()
    means = _honest_means(replicas, 3)
    means[hostile] = [torch.full_like(t, float("nan")) for t in means[hostile]]
    results = _all_reduce(replicas, 3, means, [None, None, None])
    for i in (0, 1):
        assert results[i] is None
        assert "declared gradient norm nan" in replicas[i].group.suspects.get(replicas[hostile].peer_id, "")
        assert replicas[1 - i].peer_id not in replicas[i].group.suspects

    # epoch 4: sign-flipped gradients of honest size (the norm checks pass): named for their direction, refused
    for r in replicas:
        r.group.suspects.clear()
    means = _honest_means(replicas, 4)
    means[hostile] = [-t for t in means[hostile]]
    results = _all_reduce(replicas, 4, means, [None, None, None])
    for i in (0, 1):
        assert results[i] is None, "an honest replica accepted an average with sign-flipped gradients"
        assert "against the group" in replicas[i].group.suspects.get(replicas[hostile].peer_id, "")
        assert replicas[i].peer_id not in replicas[1 - i].group.suspects

    # epoch 5: sign-flipped gradients sent under the sketch and norm of honest ones (the norm bound passes, the
    # result is smaller than the declared norms allow): the result's sketch is not the declared ones' average
    for r in replicas:
        r.group.suspects.clear()
    means = _honest_means(replicas, 5)
    honest = means[hostile]
    means[hostile] = [-t for t in honest]
    before = [r.group.inconsistent_epochs for r in replicas]
    results = _all_reduce(replicas, 5, means, [None, None, global_norm(honest)], sketched={hostile: honest})
    for i in (0, 1):
        assert results[i] is None, "an honest replica accepted gradients other than their sender declared"
        assert replicas[i].group.inconsistent_epochs == before[i] + 1
        # its declarations looked honest; what it showed when asked is not what it declared
        assert "sketch is not the one it declared" in replicas[i].group.suspects.get(replicas[hostile].peer_id, "")
        assert replicas[1 - i].peer_id not in replicas[i].group.suspects

    # epoch 6: NaN gradients sent under an honest norm and sketch: the result is not finite; asked, the sender shows
    # what it sent: named, refused
    for r in replicas:
        r.group.suspects.clear()
    means = _honest_means(replicas, 6)
    honest = means[hostile]
    means[hostile] = [torch.full_like(t, float("nan")) for t in honest]
    results = _all_reduce(replicas, 6, means, [None, None, global_norm(honest)], sketched={hostile: honest})
    for i in (0, 1):
        assert results[i] is None, "an honest replica accepted a non-finite average"
        assert "not finite" in replicas[i].group.suspects.get(replicas[hostile].peer_id, "")
        assert replicas[1 - i].peer_id not in replicas[i].group.suspects


def _flipped_under_the_sketch(tensors: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """A member that knows the sketch's seed (it is public): ``-tensors`` plus the small correction that gives it
    the sketch of ``tensors`` (spread evenly over each bucket's coordinates). Its norm and sketch are what it
    declares, so the result is consistent; only its direction outside the sketch is flipped."""
    from swarm.sanity import SKETCH_SIZE

    placed = []
    for k, t in enumerate(tensors):  # the buckets and signs swarm.sanity.sketch draws for tensor k
        g = torch.Generator().manual_seed((seed + k * 0x9E3779B97F4A7C15) % (1 << 63))
        buckets = torch.randint(SKETCH_SIZE, (t.numel(),), generator=g)
        signs = torch.randint(2, (t.numel(),), generator=g, dtype=torch.int8).to(torch.float64) * 2 - 1
        placed.append((buckets, signs))
    counts = torch.zeros(SKETCH_SIZE, dtype=torch.float64)
    for buckets, _ in placed:
        counts.index_add_(0, buckets, torch.ones(len(buckets), dtype=torch.float64))
    target = 2 * sketch(tensors, seed) / counts.clamp(min=1)  # what the correction adds to each bucket, per coordinate
    return [
        (-t.double().reshape(-1) + signs * target[buckets]).reshape(t.shape).float()
        for t, (buckets, signs) in zip(tensors, placed, strict=True)
    ]


@pytest.mark.timeout(300)
def test_an_audit_names_a_member_that_flips_its_gradient_under_an_honest_sketch(replicas: list[SpanServer]) -> None:
    """The sketch checks alone accept it (epoch 10); audited, the members show their gradients whole and the
    flipped one is named for its direction, the result refused (epoch 11)."""
    hostile = 2
    for r in replicas:
        r.group.suspects.clear()
    try:
        for epoch, rate in ((10, 0.0), (11, 1.0)):
            for r in replicas:
                r.group.settings.audit_rate = rate
            means = _honest_means(replicas, epoch)
            seed = sketch_seed(replicas[0].group.settings.run_id, epoch)
            means[hostile] = _flipped_under_the_sketch(means[hostile], seed)
            honest = sketch(_honest_means(replicas, epoch)[hostile], seed)
            assert sketch_mismatch(sketch(means[hostile], seed), {"h": honest}, {"h": 1.0}) < 1e-6
            audited = [r.group.audited_epochs for r in replicas]
            results = _all_reduce(replicas, epoch, means, [None, None, None])
            for i in (0, 1):
                if rate == 0:  # nothing in what it declared or in the result gives it away
                    assert results[i] is not None and not replicas[i].group.suspects
                else:
                    assert results[i] is None, "an audited replica accepted a gradient flipped under its sketch"
                    assert "against the group" in replicas[i].group.suspects.get(replicas[hostile].peer_id, "")
                    assert replicas[1 - i].peer_id not in replicas[i].group.suspects
                    assert replicas[i].group.audited_epochs == audited[i] + 1
    finally:
        for r in replicas:
            r.group.settings.audit_rate = 0.125
