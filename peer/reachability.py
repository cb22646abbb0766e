"""Can other peers open a connection to this one? Asked of the coordinator, which dials back (coordinator.reachability).

Three answers, each with what to do:

- ``direct``: a fresh libp2p node at the coordinator reached this peer at its public address. Trainers and
  replicas anywhere can call it.
- ``relayed``: not reachable directly, but libp2p holds a relay reservation (``/p2p-circuit`` addresses, with
  ``--use-auto-relay``): others reach it through that relay, slower. The check does not dial through the relay.
- ``unreachable``: nothing reached it (a NAT or firewall drops inbound connections). It still serves the peers
  that it dialed itself (it keeps the connections it opens to its initial peers), but a trainer or replica behind
  another NAT cannot reach it. The advice names the TCP port to forward.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Literal

from swarm.maddrs import tcp_endpoint

Reach = Literal["direct", "relayed", "unreachable"]


@dataclass(frozen=True)
class Reachability:
    reach: Reach
    detail: str
    advice: str = ""


def _listen_ports(maddrs: list[str]) -> list[int]:
    """The TCP ports this peer listens on outside loopback (what a router would forward)."""
    endpoints = [t for t in map(tcp_endpoint, maddrs) if t is not None and t[1] not in ("127.0.0.1", "::1")]
    return list(dict.fromkeys(port for _, _, port in endpoints))


def classify(answer: Any, maddrs: list[str], host_maddrs: tuple[str, ...] = ()) -> Reachability:
    """Turn a ``CheckReachabilityResponse`` for this peer's ``maddrs`` into an answer with advice.

    ``host_maddrs`` are what the peer was told to listen on (``--host-maddrs``): a port 0 there is random on each
    start, so forwarding it needs a fixed port first."""
    ip = answer.observed_ip or "?"
    if answer.reached:
        return Reachability("direct", f"the coordinator dialed {answer.reached[0]} from a fresh connection")
    why = f" ({answer.detail})" if answer.detail else ""
    relays = [a for a in maddrs if "/p2p-circuit" in a]
    if relays:
        return Reachability(
            "relayed",
            f"not reachable at {ip} directly{why}; others reach it through a relay: {relays[0]}",
            "relayed traffic is slower: forward a TCP port to this machine for direct connections",
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


__all__ = ["Reachability", "check_with", "classify"]
