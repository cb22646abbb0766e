"""Circuit relays for peers behind NAT: the libp2p options a peer starts with once it knows its reachability.

A peer that nothing can dial (a home behind a NAT without port forwarding) reserves a slot with a relay, a public
libp2p node that accepts a connection for it and splices it to the one the home holds open (circuit relay v2).
Others reach it at ``/ip4/<relay>/tcp/<port>/p2p/<relay id>/p2p-circuit/p2p/<its id>``: hivemind's p2pd finds that
address through its libp2p DHT and dials it like any other, so every protocol (span calls, all-reduce, state
download) works through it. The relay peers reserve with is the coordinator's DHT node (it must be public anyway);
every hivemind node with ``use_relay`` (the default) runs the relay service.

Two things about hivemind 1.1.12's p2pd (go-libp2p 0.32), both measured on the namespace testbed (tests/netns):

- With ``-autoRelay`` hivemind always leaves the daemon's relay *discovery* on; go-libp2p's autorelay then waits for
  4 relay candidates or a 3-minute boot delay before it reserves anything (a relay address appeared 3 min 13 s
  after start; the round waited until then). Given ``-trustedRelays`` and ``-relayDiscovery=0``, p2pd uses
  go-libp2p's static-relay mode instead and reserves with those relays at once (under a second). ``P2P.create``
  has no parameter for ``relayDiscovery`` (it calls it deprecated, yet the daemon reads it), so :func:`install`
  wraps ``P2P._make_process_args`` to add ``-relayDiscovery=0`` whenever trusted relays are given. hivemind's DHT
  is a forked process: it inherits the wrap.
- A relay must not be started with ``force_reachability="public"``. p2pd starts two relay services for the same
  protocol: go-libp2p's relay manager, with the daemon's limits (4 GiB and 30 min per relayed connection), which it
  starts once the node is public, and a plain ``relay.New`` with go-libp2p's defaults (128 KiB and 2 min, meant
  for hole-punching handshakes only), started right after the host. The one registered last answers. Forced
  public, the manager starts first and the 128 KiB relay wins: every span call over 128 KiB was reset ("the
  stream ended without an answer"). Left to AutoNAT, the manager's relay comes last: 3 MB calls pass.

Hole punching (DCUtR) is on in every hivemind node (``-autonat``): libp2p upgrades a relayed connection to a
direct one where both NATs allow it, but only once several peers observed the same public address, so in a
small round relayed traffic stays relayed. It all crosses the relay's link twice (in and out).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from hivemind.p2p import P2P

Reach = Literal["public", "private"]

_installed = False


def install() -> None:
    """Make p2pd reserve with its trusted relays at once (see the module doc). Idempotent; affects only nodes
    started with ``trusted_relays``."""
    global _installed
    if _installed:
        return
    make_args = P2P._make_process_args

    def with_static_relays(*args: Any, **kwargs: Any) -> list[str]:
        if kwargs.get("trustedRelays"):
            kwargs["relayDiscovery"] = False
        return make_args(*args, **kwargs)

    P2P._make_process_args = staticmethod(with_static_relays)  # type: ignore[method-assign]
    _installed = True


def options(reach: Reach | None, relays: Sequence[str] = ()) -> dict[str, Any]:
    """hivemind ``DHT`` / ``P2P.create`` keyword arguments for a node whose reachability is known.

    ``private`` (nothing can dial it): reserve a slot with ``relays`` (multiaddrs with ``/p2p/<id>``) at once.
    ``public`` (the coordinator dialed it back) and ``None``: hivemind's defaults; a public node is not forced
    public, as that would leave it relaying 128 KiB per connection (see the module doc).
    """
    if reach == "private":
        if not relays:
            raise ValueError("no relay to reserve a slot with: pass --relays MADDR (a public peer or the coordinator's "
                             "DHT node, with /p2p/<peer id>)")  # fmt: skip
        install()
        return {"force_reachability": "private", "use_relay": True, "use_auto_relay": True,
                "trusted_relays": one_address_per_relay(relays)}  # fmt: skip
    return {}


def one_address_per_relay(relays: Sequence[str]) -> list[str]:
    """One multiaddr per relay peer id, the most reachable first (public, then private, then loopback).

    p2pd reads each trusted relay multiaddr as a relay of its own and waits until it has tried as many distinct
    relays as it was given: the same node listed twice (the coordinator's 127.0.0.1 and public addresses) would
    hold the reservation back for the 3-minute boot delay.
    """
    best: dict[str, tuple[int, str]] = {}
    for maddr in relays:
        peer_id = maddr.rsplit("/p2p/", 1)[-1] if "/p2p/" in maddr else ""
        if not peer_id:
            raise ValueError(f"relay address {maddr!r} has no /p2p/<peer id>")
        rank = _rank(maddr)
        if peer_id not in best or rank < best[peer_id][0]:
            best[peer_id] = (rank, maddr)
    return [maddr for _, maddr in best.values()]


def _rank(maddr: str) -> int:
    import ipaddress

    parts = maddr.split("/")
    try:
        ip = ipaddress.ip_address(parts[2]) if len(parts) > 2 and parts[1] in ("ip4", "ip6") else None
    except ValueError:
        ip = None
    if ip is None:
        return 1  # a DNS name: as good as a private address
    return 2 if ip.is_loopback else 1 if ip.is_private else 0


def circuit_addresses(maddrs: Sequence[str]) -> list[str]:
    """The relayed addresses (``/p2p-circuit``) among ``maddrs``."""
    return [m for m in maddrs if "/p2p-circuit" in m]
