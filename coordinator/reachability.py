"""Dial a volunteer back over libp2p, as another peer would have to, for its startup self-check.

``CheckReachability`` names a peer id and the peer's own multiaddrs. The coordinator starts a fresh libp2p node
(its own p2pd: no connection the peer opened earlier can be reused, unlike the coordinator's DHT node) whose
only bootstrap peer is one address of the caller (hivemind's p2pd binary, run directly): it starts only when it
reached that address and the libp2p handshake proved ``peer_id`` there, and exits with "failed to connect to
bootstrap peers" otherwise. Nothing else is exchanged.

What is dialed is bounded so that the coordinator cannot be made to probe anyone else: only the IP address the
gRPC call came from (for a peer behind NAT, its router's public side), with each TCP port among the peer's
multiaddrs (a port forwarded as is) and the ports of the peer's multiaddrs announced at that address; at most
:data:`MAX_TARGETS` addresses, each for at most :data:`PROBE_TIMEOUT_S` seconds, and at most
:data:`MAX_CONCURRENT` probes at once (``RESOURCE_EXHAUSTED`` beyond; the per-address rate limit applies too).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import select
import subprocess
import tempfile
import threading
import time

import grpc

from coordinator.context import CoordinatorContext
from coordinator.validation import HandlerError, check_multiaddrs, check_name, invalid
from swarm.maddrs import tcp_endpoint
from swarm.proto import coordinator_pb2 as pb

MAX_TARGETS = 4  # addresses dialed per call
PROBE_TIMEOUT_S = 5.0  # per address: a NAT that drops inbound SYNs never answers, so each dial waits this long
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


def probe_targets(ip: str, peer_id: str, multiaddrs: list[str]) -> list[str]:
    """The multiaddrs to dial: ``ip`` (the caller's) with each TCP port of ``multiaddrs``, those announced at ``ip``
    first; at most :data:`MAX_TARGETS`."""
    proto = "ip6" if ":" in ip else "ip4"
    parsed = [t for t in map(tcp_endpoint, multiaddrs) if t is not None]
    ports = [port for _, host, port in parsed if host == ip] + [port for _, _, port in parsed]
    unique = list(dict.fromkeys(ports))[:MAX_TARGETS]
    return [f"/{proto}/{ip}/tcp/{port}/p2p/{peer_id}" for port in unique]


def _p2pd_path() -> str:
    from importlib.resources import files

    return str(files("hivemind") / "hivemind_cli" / "p2pd")


def _dial(target: str, timeout: float) -> str:
    """'' when a fresh libp2p node reached ``target`` (and the peer id in it), else the reason it did not.

    The node is hivemind's p2pd binary, started directly with ``subprocess`` (fork + exec with no Python code in
    between) and told to bootstrap from ``target`` only: it prints its "Peer ID:" line once it connected, or exits
    with "failed to connect to bootstrap peers". Not through ``hivemind.p2p.P2P``: that forks through the running
    event loop, and under uvloop in a process with many threads (gRPC workers, torch) the forked child ran Python
    code and crashed (seen as "Daemon failed to start: None", then as a segfault of the child).
    """
    with tempfile.TemporaryDirectory(prefix="loraswarm-probe-") as tmp:
        argv = [_p2pd_path(), "-b=1", f"-bootstrapPeers={target}", "-hostAddrs=/ip4/127.0.0.1/tcp/0",
                f"-listen=/unix{tmp}/p2pd.sock", "-autonat=0", "-natPortMap=0", "-relay=0", "-autoRelay=0",
                "-connManager=0", f"-idleTimeout={timeout + 5:.0f}s", "-tls=1"]  # fmt: skip
        env = dict(os.environ, GOLOG_LOG_LEVEL="error")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=env)  # fmt: skip
        assert proc.stdout is not None
        fd, out, ended, deadline = proc.stdout.fileno(), b"", False, time.monotonic() + timeout
        try:
            # raw reads (no buffered readline: select() would not see lines already read into Python's buffer)
            while b"Peer ID:" not in out and len(out) < 65536 and (left := deadline - time.monotonic()) > 0:
                if not select.select([fd], [], [], left)[0]:
                    break
                chunk = os.read(fd, 4096)
                if not chunk:  # p2pd exited (or is exiting)
                    ended = True
                    break
                out += chunk
            if b"Peer ID:" in out:
                return ""
            last = (out.decode(errors="replace").strip().splitlines() or [""])[-1]
            if not ended:
                return f"no answer within {timeout:.0f} s"
            if "failed to connect to bootstrap peers" in last:
                return "no libp2p handshake with that peer there (refused, dropped, or another peer id)"
            return f"probe exited: {last[-200:]}"
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            proc.stdout.close()


def dial_all(targets: list[str], timeout: float = PROBE_TIMEOUT_S) -> tuple[list[str], str]:
    """The targets reached and the first failure's reason (dialed one after another, fresh node each)."""
    reached, why = [], ""
    for target in targets:
        error = _dial(target, timeout)
        if not error:
            reached.append(target)
        elif not why:
            why = f"{target}: {error}"
    return reached, why


def check_reachability(
    ctx: CoordinatorContext, req: pb.CheckReachabilityRequest, peer: str
) -> pb.CheckReachabilityResponse:
    check_name("peer_id", req.peer_id)
    check_multiaddrs(req.multiaddrs)
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
        return pb.CheckReachabilityResponse(observed_ip=ip, detail="no TCP multiaddr given: nothing to dial",
                                            relays=_relays(ctx))  # fmt: skip
    if not _slots.acquire(blocking=False):
        raise HandlerError(grpc.StatusCode.RESOURCE_EXHAUSTED, "other reachability checks are running; retry soon")
    try:
        reached, why = dial_all(targets)
    finally:
        _slots.release()
    ctx.metrics.reachability_checks.labels(outcome="reached" if reached else "unreached").inc()
    return pb.CheckReachabilityResponse(observed_ip=ip, reached=reached, tried=targets, detail=why, relays=_relays(ctx))


def _relays(ctx: CoordinatorContext) -> list[str]:
    """The coordinator's DHT node, when it serves as a relay (``dht_relay``): where a peer nobody reaches can
    reserve a slot (swarm.relays picks one address per relay, public ones first)."""
    return list(ctx.dht_initial_peers) if ctx.config.dht_relay else []


__all__ = ["caller_ip", "check_reachability", "probe_targets"]
