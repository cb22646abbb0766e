"""CheckReachability: the coordinator dials a peer back from a fresh libp2p node, only at the caller's own IP."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hivemind.p2p import P2P

from coordinator import reachability
from coordinator.config import CoordinatorConfig
from coordinator.context import CoordinatorContext
from coordinator.reachability import MAX_TARGETS, caller_ip, probe_targets
from coordinator.servicer import CoordinatorServicer
from peer.reachability import classify
from swarm.proto import coordinator_pb2 as pb
from tests.unit.test_coordinator_servicer import Aborted, FakeContext

pytestmark = pytest.mark.timeout(60)
PID = "12D3KooWNBwdkdDFVsk9ciCDybWtRadXKrrqfEL829aj9Qde7LiR"


def test_caller_ip_of_grpc_peer_strings() -> None:
    assert caller_ip("ipv4:198.51.100.7:40212") == "198.51.100.7"
    assert caller_ip("ipv6:[::1]:40212") == "::1"
    assert caller_ip("unix:/tmp/sock") == ""
    assert caller_ip("ipv4:not-an-ip:1") == ""


def test_only_the_callers_ip_is_dialed_with_the_peers_ports() -> None:
    maddrs = [
        "/ip4/10.1.0.2/tcp/31337",  # a private address behind NAT: its port is tried at the caller's IP
        "/ip4/203.0.113.9/tcp/22",  # someone else's address: never dialed there
        "/ip4/198.51.100.7/tcp/4001",  # announced at the caller's IP: tried first
        "/ip4/198.51.100.7/tcp/4001/p2p/X/p2p-circuit",  # relay circuits are not dialed
        "/ip4/10.1.0.2/udp/31337/quic",
        "garbage",
    ]
    targets = probe_targets("198.51.100.7", PID, maddrs)
    assert targets == [f"/ip4/198.51.100.7/tcp/{port}/p2p/{PID}" for port in (4001, 31337, 22)]
    many = [f"/ip4/10.0.0.1/tcp/{port}" for port in range(1000, 1020)]
    assert len(probe_targets("198.51.100.7", PID, many)) == MAX_TARGETS


@pytest.fixture(scope="module")
def listening_peer() -> Iterator[tuple[str, list[str]]]:
    """A real libp2p node on 127.0.0.1 (its own loop in a thread): its peer id and multiaddrs."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    node = asyncio.run_coroutine_threadsafe(P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"]), loop).result(30)
    maddrs = asyncio.run_coroutine_threadsafe(node.get_visible_maddrs(), loop).result(10)
    yield str(node.peer_id), [str(m) for m in maddrs]
    asyncio.run_coroutine_threadsafe(node.shutdown(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@pytest.fixture
def servicer(tmp_path: Path) -> CoordinatorServicer:
    config = CoordinatorConfig(workdir=tmp_path, store="memory", rate_limit_per_s=0)
    return CoordinatorServicer(CoordinatorContext.from_config(config))


def call(servicer: CoordinatorServicer, peer: str, peer_id: str, maddrs: list[str]) -> pb.CheckReachabilityResponse:
    raw = pb.CheckReachabilityRequest(peer_id=peer_id, multiaddrs=maddrs).SerializeToString()
    reply: pb.CheckReachabilityResponse = servicer.call("CheckReachability", raw, FakeContext(peer))
    return reply


def test_a_listening_peer_is_reached_and_only_with_its_own_peer_id(
    servicer: CoordinatorServicer, listening_peer: tuple[str, list[str]]
) -> None:
    peer_id, maddrs = listening_peer
    reply = call(servicer, "ipv4:127.0.0.1:5555", peer_id, maddrs)
    assert reply.observed_ip == "127.0.0.1" and len(reply.reached) == 1, reply
    assert reply.reached[0].startswith("/ip4/127.0.0.1/tcp/") and reply.reached[0].endswith(f"/p2p/{peer_id}")
    assert classify(reply, maddrs).reach == "direct"

    impostor = call(servicer, "ipv4:127.0.0.1:5555", PID, maddrs)  # another peer id at that address: no handshake
    assert not impostor.reached and "no libp2p handshake" in impostor.detail, impostor
    # A caller at another address gets its own address dialed, never the one it lists (127.0.0.2 is loopback
    # too, but the node listens on 127.0.0.1 only): the coordinator cannot be sent to probe someone else.
    elsewhere = call(servicer, "ipv4:127.0.0.2:5555", peer_id, maddrs)
    assert list(elsewhere.tried) == [m.replace("127.0.0.1", "127.0.0.2") for m in reply.tried]
    assert not elsewhere.reached
    outcomes = {o: servicer.ctx.metrics.registry.get_sample_value("swarm_coordinator_reachability_checks_total",
                                                                  {"outcome": o}) for o in ("reached", "unreached")}  # fmt: skip
    assert outcomes == {"reached": 1.0, "unreached": 2.0}


def test_bad_requests_and_a_busy_prober_get_clear_statuses(servicer: CoordinatorServicer) -> None:
    for request in (
        pb.CheckReachabilityRequest(peer_id="not base58 !", multiaddrs=["/ip4/1.2.3.4/tcp/1"]),
        pb.CheckReachabilityRequest(peer_id="QmNotAPeerId", multiaddrs=["/ip4/1.2.3.4/tcp/1"]),
        pb.CheckReachabilityRequest(peer_id=PID, multiaddrs=["/ip4/1.2.3.4/tcp/1"] * 17),
    ):
        context = FakeContext()
        with pytest.raises(Aborted):
            servicer.call("CheckReachability", request.SerializeToString(), context)
        assert context.code is grpc.StatusCode.INVALID_ARGUMENT, context.details
    nothing = call(servicer, "ipv4:127.0.0.1:1", PID, ["/ip4/127.0.0.1/udp/1/quic"])
    assert not nothing.tried and nothing.detail == "no TCP multiaddr given: nothing to dial"

    taken = [reachability._slots.acquire(blocking=False) for _ in range(reachability.MAX_CONCURRENT)]
    try:
        assert all(taken)
        context = FakeContext()
        with pytest.raises(Aborted):
            raw = pb.CheckReachabilityRequest(peer_id=PID, multiaddrs=["/ip4/127.0.0.1/tcp/1"]).SerializeToString()
            servicer.call("CheckReachability", raw, context)
        assert context.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for _ in taken:
            reachability._slots.release()


def test_advice_names_the_port_to_forward_or_asks_to_pin_one() -> None:
    unreached = pb.CheckReachabilityResponse(observed_ip="198.51.100.4", detail="no answer within 5 s")
    fixed = classify(unreached, ["/ip4/10.1.0.2/tcp/31337/p2p/X", "/ip4/127.0.0.1/tcp/31337/p2p/X"],
                     ("/ip4/0.0.0.0/tcp/31337",))  # fmt: skip
    assert fixed.reach == "unreachable" and "public address 198.51.100.4 (no answer within 5 s)" in fixed.detail
    assert fixed.advice.startswith("forward TCP port 31337 on the router to this machine")
    random_port = classify(unreached, ["/ip4/10.1.0.2/tcp/40111/p2p/X"], ("/ip4/0.0.0.0/tcp/0",))
    assert random_port.advice.startswith("listen on a fixed port (--host-maddrs /ip4/0.0.0.0/tcp/31337), then forward")
    relayed = classify(unreached, ["/ip4/10.1.0.2/tcp/40111/p2p/X", "/ip4/198.51.100.2/tcp/4001/p2p/R/p2p-circuit"])
    assert relayed.reach == "relayed" and "through a relay: /ip4/198.51.100.2/tcp/4001/p2p/R/p2p-circuit" in (
        relayed.detail
    )


def test_peers_starting_together_wait_for_a_free_prober(tmp_path: Path, listening_peer: tuple[str, list[str]]) -> None:
    """A real coordinator with every probe slot taken: the peer's check retries until one frees up."""
    from coordinator.server import serve
    from peer.coordinator_client import CoordinatorClient
    from peer.reachability import check_with

    server = serve(CoordinatorConfig(host="127.0.0.1", port=0, metrics_port=None, workdir=tmp_path, dht=False))
    client = CoordinatorClient(server.address, cert=server.tls_cert_path)
    taken = [reachability._slots.acquire(blocking=False) for _ in range(reachability.MAX_CONCURRENT)]
    release = threading.Timer(2.5, lambda: [reachability._slots.release() for _ in taken])
    try:
        assert all(taken)
        release.start()
        peer_id, maddrs = listening_peer
        found = check_with(client, peer_id, maddrs)
        assert found.reach == "direct", found
        busy = server.ctx.metrics.registry.get_sample_value(
            "swarm_coordinator_rpc_errors_total", {"method": "CheckReachability", "code": "RESOURCE_EXHAUSTED"}
        )
        assert busy is not None and busy >= 1  # it was turned away at least once before it got through
    finally:
        release.join()
        client.close()
        server.stop(grace=0)


def test_the_coordinator_offers_its_dht_node_as_relay_unless_told_not_to(tmp_path: Path) -> None:
    relay = f"/ip4/20.0.0.2/tcp/4001/p2p/{PID}"
    for offer, expected in ((True, [relay]), (False, [])):
        config = CoordinatorConfig(workdir=tmp_path, store="memory", rate_limit_per_s=0, dht_relay=offer)
        ctx = CoordinatorContext.from_config(config)
        ctx.dht_initial_peers = (relay,)
        reply = call(CoordinatorServicer(ctx), "ipv4:127.0.0.1:5555", PID, [])  # nothing to dial: answered at once
        assert list(reply.relays) == expected
        assert classify(reply, []).relays == tuple(expected)


def test_static_relays_reserve_at_once_and_each_relay_is_listed_once() -> None:
    from swarm import relays

    other = "12D3KooWQTgcddri2NoBFLAoEK8Wdc12aTBCyJvXiGPvk35zgycn"
    given = [f"/ip4/127.0.0.1/tcp/1/p2p/{PID}", f"/ip4/10.0.0.2/tcp/1/p2p/{PID}", f"/ip4/20.0.0.2/tcp/1/p2p/{PID}",
             f"/dns4/relay.example/tcp/2/p2p/{other}"]  # fmt: skip
    # the same node twice would hold p2pd's reservation back (it waits for as many relays as it was given)
    assert relays.one_address_per_relay(given) == [f"/ip4/20.0.0.2/tcp/1/p2p/{PID}", given[3]]
    with pytest.raises(ValueError, match="no /p2p/<peer id>"):
        relays.one_address_per_relay(["/ip4/20.0.0.2/tcp/1"])
    with pytest.raises(ValueError, match="no relay to reserve a slot with"):
        relays.options("private", ())
    assert relays.options("public") == {} and relays.options(None) == {}  # never forced public (module doc)

    kwargs = relays.options("private", given)
    assert kwargs["force_reachability"] == "private" and kwargs["use_auto_relay"] is True
    # hivemind's own argument list, as P2P.create builds it: static relays only, no 3-minute discovery
    args = P2P._make_process_args("p2pd", autoRelay=True, trustedRelays=",".join(kwargs["trusted_relays"]))
    assert "-relayDiscovery=0" in args and "-autoRelay=1" in args
    assert "-relayDiscovery=0" not in P2P._make_process_args("p2pd", autoRelay=True)  # only with trusted relays


def test_relay_flags_that_contradict_each_other_are_refused() -> None:
    from pydantic import ValidationError

    from peer.config import PeerConfig
    from peer.reachability import decide

    assert PeerConfig(use_auto_relay=True).reach == "private" and PeerConfig().reach == "auto"
    with pytest.raises(ValidationError, match="drop --no-relay"):
        PeerConfig(use_auto_relay=True, use_relay=False)
    with pytest.raises(ValidationError, match="means --reachability private"):
        PeerConfig(use_auto_relay=True, reachability="public")
    with pytest.raises(ValidationError, match=r"must end with /p2p/<peer id>"):
        PeerConfig(relays=("/ip4/20.0.0.2/tcp/1",))
    # told, nothing is asked of the coordinator (no client needed)
    assert decide(PeerConfig(reachability="public"), client=None).reach == "public"
    forced = decide(PeerConfig(use_auto_relay=True, relays=(f"/ip4/20.0.0.2/tcp/1/p2p/{PID}",)), client=None)
    assert forced.reach == "private" and forced.relays == (f"/ip4/20.0.0.2/tcp/1/p2p/{PID}",) and forced.answer is None
