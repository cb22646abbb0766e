"""Can other peers open a connection to this one? Asked of the coordinator, which dials back (coordinator.reachability).

Three answers, each with what to do:

- ``direct``: a fresh libp2p node at the coordinator reached this peer at its public address. Trainers and
  replicas anywhere can call it.
- ``relayed``: not reachable directly, but libp2p holds a relay reservation (``/p2p-circuit`` addresses): others
  reach it through that relay (swarm.relays), slower. The check does not dial through the relay.
- ``unreachable``: nothing reached it (a NAT or firewall drops inbound connections). It still serves the peers
  that it dialed itself (it keeps the connections it opens to its initial peers), but a trainer or replica behind
  another NAT cannot reach it. The advice names the TCP port to forward.

:func:`decide` asks before the daemon starts libp2p (``--reachability auto``, the default with a coordinator): a
peer the coordinator reached starts as ``public`` (libp2p's defaults: it also relays for others), one it did not
reach starts as ``private`` with a relay slot at the relays the coordinator offers (its DHT node), so it is
reachable within seconds instead of after libp2p's own guesses (AutoNAT, then a 3-minute relay search).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from swarm import relays as relay_options
from swarm.maddrs import tcp_endpoint

if TYPE_CHECKING:
    from peer.config import PeerConfig

Reach = Literal["direct", "relayed", "unreachable"]
CIRCUIT_WAIT_S = 10.0  # how long a private node may take to reserve its relay slot (measured: under a second)


@dataclass(frozen=True)
class Reachability:
    reach: Reach
    detail: str
    advice: str = ""
    relays: tuple[str, ...] = ()  # relays the coordinator offers (CheckReachabilityResponse.relays)


def _listen_ports(maddrs: list[str]) -> list[int]:
    """The TCP ports this peer listens on outside loopback (what a router would forward)."""
    endpoints = [t for t in map(tcp_endpoint, maddrs) if t is not None and t[1] not in ("127.0.0.1", "::1")]
    return list(dict.fromkeys(port for _, _, port in endpoints))


def classify(answer: Any, maddrs: list[str], host_maddrs: tuple[str, ...] = ()) -> Reachability:
    """Turn a ``CheckReachabilityResponse`` for this peer's ``maddrs`` into an answer with advice.

    ``host_maddrs`` are what the peer was told to listen on (``--host-maddrs``): a port 0 there is random on each
    start, so forwarding it needs a fixed port first."""
    ip = answer.observed_ip or "?"
    offered = tuple(answer.relays)
    if answer.reached:
        return Reachability(
            "direct", f"the coordinator dialed {answer.reached[0]} from a fresh connection", "", offered
        )
    why = f" ({answer.detail})" if answer.detail else ""
    circuits = relay_options.circuit_addresses(maddrs)
    if circuits:
        return Reachability(
            "relayed",
            f"not reachable at {ip} directly{why}; others reach it through a relay: {circuits[0]}",
            "relayed traffic is slower and crosses the relay's link: forward a TCP port to this machine for direct "
            "connections",
            offered,
        )
    ports = _listen_ports(maddrs)
    random_port = any(a.rstrip("/").endswith("/tcp/0") for a in host_maddrs)
    if not ports or random_port:
        port = 31337
        pin = f"listen on a fixed port (--host-maddrs /ip4/0.0.0.0/tcp/{port}), then "
    else:
        port, pin = ports[0], ""
    return Reachability(
        "unreachable",
        f"the coordinator could not dial this peer at its public address {ip}{why}: a NAT or firewall drops inbound "
        "connections; only peers it dials itself can use it",
        f"{pin}forward TCP port {port} on the router to this machine (or open it in the firewall), or run with "
        "--use-auto-relay to be reached through a relay (slower)",
        offered,
    )


def check_with(
    client: Any, peer_id: str, maddrs: list[str], host_maddrs: tuple[str, ...] = (), attempts: int = 8
) -> Reachability:
    """Ask the coordinator (a ``CoordinatorClient``) to dial this peer (``peer_id`` at ``maddrs``) back.

    The coordinator runs only a few checks at once and answers ``RESOURCE_EXHAUSTED`` beyond (peers that start
    together): this retries after 1-4 s with jitter, ``attempts`` times in all; other errors raise."""
    import grpc

    for _ in range(attempts - 1):
        try:
            return classify(client.check_reachability(peer_id, maddrs), maddrs, host_maddrs)
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            time.sleep(random.uniform(1.0, 4.0))
    return classify(client.check_reachability(peer_id, maddrs), maddrs, host_maddrs)


def visible_maddrs(latest: Callable[[], list[Any]], private: bool) -> list[str]:
    """A node's multiaddrs as others see them (``latest()``: what its p2pd reports now). A ``private`` node first
    waits (at most ``CIRCUIT_WAIT_S``) for its relay reservation, so that the check can answer ``relayed``."""
    maddrs = [str(m) for m in latest()]
    deadline = time.monotonic() + CIRCUIT_WAIT_S
    while private and not relay_options.circuit_addresses(maddrs) and time.monotonic() < deadline:
        time.sleep(0.25)  # the reservation comes within a second
        maddrs = [str(m) for m in latest()]
    return maddrs


def probe(
    config: PeerConfig, client: Any, reach: relay_options.Reach | None = None, relays: tuple[str, ...] = (),
    timeout: float = 5.0,
) -> Reachability:  # fmt: skip
    """Start a libp2p node as the daemon would (its listen and announce addresses; ``reach`` and ``relays`` as
    swarm.relays.options), let the coordinator dial it back (:func:`visible_maddrs`, :func:`check_with`), stop it."""
    import asyncio

    from hivemind.p2p import P2P

    async def listen_and_ask() -> Reachability:
        options = {"use_relay": config.use_relay, **relay_options.options(reach, relays)}
        p2p = await P2P.create(host_maddrs=list(config.host_maddrs), announce_maddrs=list(config.announce_maddrs) or None,
                               startup_timeout=timeout, **options)  # fmt: skip
        loop = asyncio.get_running_loop()

        def latest() -> list[Any]:  # from the executor thread, on this loop
            return asyncio.run_coroutine_threadsafe(p2p.get_visible_maddrs(latest=True), loop).result()

        def ask() -> Reachability:
            maddrs = visible_maddrs(latest, private=reach == "private")
            return check_with(client, str(p2p.peer_id), maddrs, config.host_maddrs)

        try:
            return await loop.run_in_executor(None, ask)
        finally:
            await p2p.shutdown()

    return asyncio.run(listen_and_ask())


@dataclass(frozen=True)
class Decision:
    """How the daemon starts libp2p: ``reach`` and ``relays`` for swarm.relays.options (None: hivemind's
    defaults), and the coordinator's answer it was decided from (None when not asked)."""

    reach: relay_options.Reach | None
    relays: tuple[str, ...] = ()
    answer: Reachability | None = None

    def summary(self) -> str:
        seen = f"{self.answer.reach}: {self.answer.detail}" if self.answer else "not asked"
        if self.reach == "public":
            return f"reachable directly ({seen}); this peer can relay for peers behind NAT"
        if self.reach == "private":
            return f"reached through a relay ({seen}); reserving a slot with {', '.join(self.relays)}"
        return f"libp2p decides ({seen})"


def decide(config: PeerConfig, client: Any, timeout: float = 5.0) -> Decision:
    """Before the daemon starts libp2p: ask the coordinator to dial a node of this machine (``--reachability
    auto``) and choose ``public`` (reached), ``private`` with the relays it offers (not reached, relays allowed),
    or hivemind's defaults (not reached, no relay). ``--reachability public|private`` skips the question where it
    can (``private`` still asks when it needs the coordinator's relays)."""
    reach = config.reach
    if reach == "public":
        return Decision("public")
    if reach == "private" and config.relays:
        return Decision("private", tuple(config.relays))
    first = probe(config, client, timeout=timeout)
    if reach == "auto" and first.reach == "direct":
        return Decision("public", (), first)
    offered = tuple(config.relays) or first.relays
    if config.use_relay and offered:
        return Decision("private", offered, first)
    if reach == "private":
        raise ValueError("--reachability private (--use-auto-relay): the coordinator offers no relay; pass --relays")
    return Decision(None, (), first)


__all__ = ["Decision", "Reachability", "check_with", "classify", "decide", "probe", "visible_maddrs"]
