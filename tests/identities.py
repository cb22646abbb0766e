"""Peers with real libp2p identities for tests that drive the coordinator's handlers (no sockets).

Each name gets a deterministic Ed25519 libp2p key (``pid("a")`` is a real peer id); :class:`Peers`
signs Joins over a fresh coordinator challenge and keeps the credential each Join returns, as the
real client (``peer.coordinator_client``) does.
"""

from __future__ import annotations

import functools
import hashlib

import grpc

from coordinator import handlers
from coordinator.context import CoordinatorContext
from swarm.identity import PeerIdentity, join_payload
from swarm.proto import coordinator_pb2 as pb
from swarm.proto import coordinator_pb2_grpc as pb_grpc
from swarm.tls import channel


@functools.cache
def identity(name: str) -> PeerIdentity:
    return PeerIdentity.generate_ed25519(hashlib.sha256(name.encode()).digest())


def pid(name: str) -> str:
    """The peer id of test peer ``name``."""
    return identity(name).peer_id


def sign_join(ctx: CoordinatorContext, req: pb.JoinRequest, name: str) -> pb.JoinRequest:
    """Fill ``req``'s identity proof as peer ``name`` over a challenge ``ctx`` issued."""
    me = identity(name)
    req.challenge = ctx.challenges.issue()
    req.public_key = me.public_key_pb
    req.signature = me.sign(join_payload(req.peer_id, req.round_id, req.challenge, req.base_fingerprint,
                                         list(req.multiaddrs)))  # fmt: skip
    return req


class Peers:
    """Test peers of one coordinator context: join (signed), and the credential of each member."""

    def __init__(self, ctx: CoordinatorContext, **defaults: object) -> None:
        self.ctx = ctx
        self.defaults = defaults
        self.credentials: dict[str, str] = {}

    def join_request(self, name: str, **fields: object) -> pb.JoinRequest:
        merged = {**self.defaults, "peer_id": pid(name), **fields}
        return sign_join(self.ctx, pb.JoinRequest(**merged), name)  # type: ignore[arg-type]

    def join(self, name: str, **fields: object) -> pb.JoinResponse:
        reply = handlers.join(self.ctx, self.join_request(name, **fields))
        if reply.accepted:
            self.credentials[name] = reply.credential
        return reply

    def credential(self, name: str) -> str:
        return self.credentials.get(name, "")


class GrpcPeers:
    """The same over a live coordinator's gRPC stub: each Join signs a challenge from GetRoundSpec."""

    def __init__(self, stub: pb_grpc.CoordinatorStub, timeout: float = 10.0, **defaults: object) -> None:
        self.stub, self.timeout, self.defaults = stub, timeout, defaults
        self.credentials: dict[str, str] = {}

    def join_request(self, name: str, **fields: object) -> pb.JoinRequest:
        req = pb.JoinRequest(**{**self.defaults, "peer_id": pid(name), **fields})  # type: ignore[arg-type]
        req.challenge = self.stub.GetRoundSpec(pb.GetRoundSpecRequest(), timeout=self.timeout).join_challenge
        req.public_key = identity(name).public_key_pb
        req.signature = identity(name).sign(join_payload(req.peer_id, req.round_id, req.challenge,
                                                         req.base_fingerprint, list(req.multiaddrs)))  # fmt: skip
        return req

    def join(self, name: str, **fields: object) -> pb.JoinResponse:
        reply = self.stub.Join(self.join_request(name, **fields), timeout=self.timeout)
        if reply.accepted:
            self.credentials[name] = reply.credential
        return reply

    def credential(self, name: str) -> str:
        return self.credentials.get(name, "")

    def heartbeat(self, name: str, round_id: str = "r1", **progress: float) -> pb.HeartbeatResponse:
        req = pb.HeartbeatRequest(peer_id=pid(name), round_id=round_id, progress=pb.Progress(**progress),  # type: ignore[arg-type]
                                  credential=self.credential(name))  # fmt: skip
        return self.stub.Heartbeat(req, timeout=self.timeout)


def coordinator_channel(address: str, cert: object) -> grpc.Channel:
    """A channel to a test coordinator: TLS pinned to ``cert`` (its ``tls_cert_path``), plaintext for None."""
    return channel(address, cert if cert else None, [])  # type: ignore[arg-type]
