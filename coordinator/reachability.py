"""Dial a volunteer back over libp2p, as another peer would have to, for its startup self-check.

``CheckReachability`` names a peer id and the peer's own multiaddrs. The coordinator starts a fresh libp2p node
(its own p2pd: no connection the peer opened earlier can be reused, unlike the coordinator's DHT node) whose
only bootstrap peer is one address of the caller; the node starts only when it reached that address and the
libp2p handshake proved ``peer_id`` there (hivemind's ``P2P.create`` fails with "failed to connect to bootstrap
peers" otherwise). Nothing else is exchanged.

What is dialed is bounded so that the coordinator cannot be made to probe anyone else: only the IP address the
gRPC call came from (for a peer behind NAT, its router's public side), with each TCP port among the peer's
multiaddrs (a port forwarded as is) and the ports of the peer's multiaddrs announced at that address; at most
:data:`MAX_TARGETS` addresses, each for at most :data:`PROBE_TIMEOUT_S` seconds, and at most
:data:`MAX_CONCURRENT` probes at once (``RESOURCE_EXHAUSTED`` beyond; the per-address rate limit applies too).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading

import grpc

from coordinator.context import CoordinatorContext
from coordinator.validation import HandlerError, check_name, invalid
from swarm.proto import coordinator_pb2 as pb

MAX_MULTIADDRS, MAX_MULTIADDR_CHARS = 16, 256
MAX_TARGETS = 4  # addresses dialed per call
PROBE_TIMEOUT_S = 5.0  # per address: a NAT that drops inbound SYNs never answers, so each dial waits this long
#: what a probe reports when its own p2pd exited before printing anything (hivemind: "Daemon failed to start:
#: None"; seen twice in test runs where other swarm tests ran first in the same process, cause not found). It says
#: nothing about the dialed peer, so that probe is retried (twice).
SILENT_DEATH = "the probe's p2pd exited before it started"
MAX_CONCURRENT = 4  # probes in flight at once (each runs its own p2pd, ~30 MB)
_slots = threading.BoundedSemaphore(MAX_CONCURRENT)
log = logging.getLogger(__name__)


def caller_ip(peer: str) -> str:
    """The IP address of a grpc ``context.peer()`` (``ipv4:1.2.3.4:5678``, ``ipv6:[::1]:5678``), or ''."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        host = rest.rsplit(":", 1)[0]
    elif kind == "ipv6":
        host = rest.rsplit(":", 1)[0].strip("[]")
    else:
        return ""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return ""


def _tcp(addr: str) -> tuple[str, str, int] | None:
    """``(ip4|ip6, host, port)`` of a plain TCP multiaddr (no relay circuit), else None."""
    parts = addr.strip("/").split("/")
    if len(parts) < 4 or parts[0] not in ("ip4", "ip6") or parts[2] != "tcp" or "p2p-circuit" in parts:
        return None
    try:
        port = int(parts[3])
    except ValueError:
        return None
    return (parts[0], parts[1], port) if 0 < port < 65536 else None


def probe_targets(ip: str, peer_id: str, multiaddrs: list[str]) -> list[str]:
    """The multiaddrs to dial: ``ip`` (the caller's) with each TCP port of ``multiaddrs``, those announced at ``ip``
    first; at most :data:`MAX_TARGETS`."""
    proto = "ip6" if ":" in ip else "ip4"
    parsed = [t for t in map(_tcp, multiaddrs) if t is not None]
    ports = [port for _, host, port in parsed if host == ip] + [port for _, _, port in parsed]
    unique = list(dict.fromkeys(ports))[:MAX_TARGETS]
    return [f"/{proto}/{ip}/tcp/{port}/p2p/{peer_id}" for port in unique]


async def _dial(target: str, timeout: float) -> str:
    """'' when a fresh libp2p node reached ``target`` (and the peer id in it), else the reason it did not."""
    from hivemind.p2p import P2P

    try:
        node = await asyncio.wait_for(
            P2P.create(
                initial_peers=[target],
                host_maddrs=["/ip4/127.0.0.1/tcp/0"],  # it only dials out
                use_relay=False,
                auto_nat=False,
                nat_port_map=False,
                startup_timeout=timeout,
            ),
            timeout + 1.0,
        )
    except asyncio.TimeoutError:
        return f"no answer within {timeout:.0f} s"
    except Exception as exc:  # P2PDaemonError "failed to connect to bootstrap peers", a refused dial, ...
        text = str(exc).strip()
        if "failed to connect to bootstrap peers" in text:
            return "no libp2p handshake with that peer there (refused, dropped, or another peer id)"
        if text.endswith("failed to start: None"):  # hivemind: p2pd's output ended before its first line
            return SILENT_DEATH
        return (text.splitlines() or [""])[-1][-200:] or type(exc).__name__
    await node.shutdown()
    return ""


def dial_all(targets: list[str], timeout: float = PROBE_TIMEOUT_S) -> tuple[list[str], str]:
    """The targets reached and the first failure's reason (dialed one after another, fresh node each)."""

    async def run() -> tuple[list[str], str]:
        reached, why = [], ""
        for target in targets:
            error = await _dial(target, timeout)
            for _ in range(2):  # a probe p2pd that died before saying a word failed, not the dial: try again
                if error != SILENT_DEATH:
                    break
                log.warning(f"reachability probe of {target}: {error}; retrying")
                error = await _dial(target, timeout)
            if not error:
                reached.append(target)
            elif not why:
                why = f"{target}: {error}"
        return reached, why

    return asyncio.run(run())


def check_reachability(
    ctx: CoordinatorContext, req: pb.CheckReachabilityRequest, peer: str
) -> pb.CheckReachabilityResponse:
    check_name("peer_id", req.peer_id)
    if len(req.multiaddrs) > MAX_MULTIADDRS:
        raise invalid(f"multiaddrs: at most {MAX_MULTIADDRS}, got {len(req.multiaddrs)}")
    for i, addr in enumerate(req.multiaddrs):
        if not addr.strip() or len(addr) > MAX_MULTIADDR_CHARS:
            raise invalid(f"multiaddrs[{i}] must be a multiaddr such as /ip4/1.2.3.4/tcp/31337 "
                          f"(1-{MAX_MULTIADDR_CHARS} chars)")  # fmt: skip
    from hivemind.p2p import PeerID

    try:
        PeerID.from_base58(req.peer_id)
    except Exception:
        raise invalid(f"peer_id {req.peer_id[:64]!r} is not a libp2p peer id (base58)") from None
    ip = caller_ip(peer)
    if not ip:
        raise invalid(f"cannot tell the caller's IP address from {peer[:64]!r}: nothing to dial")
    targets = probe_targets(ip, req.peer_id, list(req.multiaddrs))
    if not targets:
        return pb.CheckReachabilityResponse(observed_ip=ip, detail="no TCP multiaddr given: nothing to dial")
    if not _slots.acquire(blocking=False):
        raise HandlerError(grpc.StatusCode.RESOURCE_EXHAUSTED, "other reachability checks are running; retry soon")
    try:
        reached, why = dial_all(targets)
    finally:
        _slots.release()
    ctx.metrics.reachability_checks.labels(outcome="reached" if reached else "unreached").inc()
    return pb.CheckReachabilityResponse(observed_ip=ip, reached=reached, tried=targets, detail=why)


__all__ = ["caller_ip", "check_reachability", "probe_targets"]
