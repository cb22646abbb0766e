"""The peer's side of the coordinator API (gRPC): join, heartbeat, upload span state, report eval, adapters.

The client proves the peer's identity at Join (a signature by its libp2p key over the coordinator's
fresh challenge), keeps the credential the coordinator returns, and attaches it to every later call of
that round itself. Over TLS it trusts only the coordinator's certificate file (pinned).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from safetensors.torch import save

from swarm import __version__
from swarm.config import RoundSpec, SpanRange
from swarm.identity import PeerIdentity, join_payload
from swarm.keys import verified_spec_json
from swarm.proto import TRAINER_ROLE
from swarm.proto import coordinator_pb2 as pb
from swarm.proto import coordinator_pb2_grpc as pb_grpc
from swarm.tls import channel

MAX_MESSAGE = 64 * 1024 * 1024


class JoinRejectedError(ValueError):
    """The coordinator refused this peer; the message says what to do, ``code`` says why (machine-readable)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code

    @property
    def retriable(self) -> bool:
        """A closed round, or one this peer was removed from, is worth waiting out (the next round takes it);
        a wrong base, version, token or span choice is not."""
        return self.code in ("round_closed", "expelled")


class CoordinatorClient:
    """Thin synchronous client; every call has a deadline and raises ``grpc.RpcError`` on transport errors.

    ``identity`` (the peer's libp2p key) is needed to Join; ``cert`` is the coordinator's TLS certificate
    to pin (None / '' = plaintext, only against a coordinator started with ``--insecure``); with
    ``public_key`` (the coordinator's adapter signing key) every round spec must carry its signature.
    """

    def __init__(
        self,
        address: str,
        join_token: str = "",
        timeout: float = 15.0,
        *,
        identity: PeerIdentity | None = None,
        cert: str | Path | None = None,
        public_key: Ed25519PublicKey | None = None,
    ):
        self.address, self.join_token, self.timeout = address, join_token, timeout
        self.identity, self.public_key = identity, public_key
        self.credentials: dict[str, str] = {}  # round id -> the credential its Join returned
        self.channel = channel(
            address,
            cert,
            options=[("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)],
        )
        self.stub = pb_grpc.CoordinatorStub(self.channel)

    def _credential(self, round_id: str) -> str:
        return self.credentials.get(round_id, "")

    def _spec(self, spec_json: str, signature: str, nonce: bytes) -> RoundSpec:
        """The round spec, after checking the coordinator's signature on it for this call's ``nonce`` (when the
        client has the coordinator's key): a forged spec, or an older answer replayed, is refused."""
        return RoundSpec.from_json(verified_spec_json(self.public_key, spec_json, signature, nonce))

    def current_spec(self) -> RoundSpec:
        nonce = os.urandom(16)
        resp = self.stub.GetRoundSpec(pb.GetRoundSpecRequest(spec_nonce=nonce), timeout=self.timeout)
        return self._spec(resp.round_spec_json, resp.round_spec_signature, nonce)

    def join(
        self,
        peer_id: str,
        maddrs: list[str],
        fingerprint: str,
        throughput: float,
        device: str,
        memory_bytes: int,
        round_id: str = "",
        preferred_span: SpanRange | None = None,
        max_blocks: int = 0,
        quantize: str = "",
        trainer_only: bool = False,
    ) -> tuple[RoundSpec, SpanRange | None, pb.JoinResponse]:
        """Join (the open round, or ``round_id``); ``preferred_span`` / ``max_blocks`` are the volunteer's choices
        (the coordinator honours them or refuses with reject code ``span``), ``quantize`` is recorded. With
        ``trainer_only`` the peer joins as a member that hosts no span (role "trainer"): the span returned is None."""
        if self.identity is None or self.identity.peer_id != peer_id:
            raise ValueError(f"joining as {peer_id} needs that peer's identity key (CoordinatorClient(identity=...))")
        challenge = self.stub.GetRoundSpec(pb.GetRoundSpecRequest(), timeout=self.timeout).join_challenge
        payload = join_payload(peer_id, round_id, challenge, fingerprint, list(maddrs))
        nonce = os.urandom(16)
        resp = self.stub.Join(
            pb.JoinRequest(
                peer_id=peer_id,
                multiaddrs=maddrs,
                base_fingerprint=fingerprint,
                software_version=__version__,
                join_token=self.join_token,
                round_id=round_id,
                capacity=pb.Capacity(memory_bytes=memory_bytes, device=device, throughput=throughput),
                public_key=self.identity.public_key_pb,
                challenge=challenge,
                signature=self.identity.sign(payload),
                preferred_span=pb.Span(start=preferred_span.start, end=preferred_span.end) if preferred_span else None,
                max_blocks=max_blocks,
                quantize=quantize,
                spec_nonce=nonce,
                role=TRAINER_ROLE if trainer_only else "",
            ),
            timeout=self.timeout,
        )
        if not resp.accepted:
            raise JoinRejectedError(
                f"the coordinator refused to let this peer join: {resp.reject_reason}", resp.reject_code
            )
        self.credentials[resp.round_id] = resp.credential
        return (
            self._spec(resp.round_spec_json, resp.round_spec_signature, nonce),
            SpanRange(start=resp.span.start, end=resp.span.end) if resp.HasField("span") else None,
            resp,
        )

    def heartbeat(
        self,
        peer_id: str,
        round_id: str,
        span: SpanRange | None,
        *,
        samples: int,
        tokens: int,
        loss: float,
        throughput: float,
        epoch: int,
        accusations: dict[str, str] | None = None,
    ) -> pb.HeartbeatResponse:
        """``span`` None: a trainer-only member. ``accusations``: members this peer caught sending bad data (peer
        id -> what), at most 16 sent."""
        caught = sorted((accusations or {}).items())[:16]
        return self.stub.Heartbeat(
            pb.HeartbeatRequest(
                peer_id=peer_id,
                round_id=round_id,
                span=pb.Span(start=span.start, end=span.end) if span is not None else None,
                progress=pb.Progress(samples=samples, tokens=tokens, loss=loss, throughput=throughput, epoch=epoch),
                credential=self._credential(round_id),
                accusations=[pb.Accusation(peer_id=p, reason=r[:256]) for p, r in caught if p != peer_id],
            ),
            timeout=self.timeout,
        )

    def upload_span_state(
        self, peer_id: str, round_id: str, span: SpanRange, epoch: int, tensors: dict[str, torch.Tensor], samples: int
    ) -> None:
        self.stub.UploadSpanState(
            pb.UploadSpanStateRequest(
                peer_id=peer_id,
                round_id=round_id,
                span=pb.Span(start=span.start, end=span.end),
                epoch=epoch,
                safetensors=save(tensors),
                samples=samples,
                credential=self._credential(round_id),
            ),
            timeout=self.timeout * 4,
        )

    def report_eval(
        self, peer_id: str, round_id: str, epoch: int, loss: float, tokens: int, candidate_sha256: str = ""
    ) -> None:
        self.stub.ReportEval(
            pb.ReportEvalRequest(peer_id=peer_id, round_id=round_id, epoch=epoch, eval_loss=loss, eval_tokens=tokens,
                                 credential=self._credential(round_id), candidate_sha256=candidate_sha256),
            timeout=self.timeout,
        )  # fmt: skip

    def clock(self) -> tuple[float, float, str]:
        """``(offset, round_trip, version)``: the coordinator's clock minus this machine's at the call's midpoint
        (seconds), the call's round trip (the offset's uncertainty is half of it), and the loraswarm version the
        coordinator requires. ValueError when the coordinator does not send its clock (an older version)."""
        sent = time.time()
        resp = self.stub.GetRoundSpec(pb.GetRoundSpecRequest(), timeout=self.timeout)
        received = time.time()
        if resp.server_time <= 0:
            raise ValueError("the coordinator does not send its clock (an older loraswarm version)")
        return resp.server_time - (sent + received) / 2, received - sent, resp.software_version

    def check_reachability(
        self, peer_id: str, maddrs: list[str], timeout: float = 40.0
    ) -> pb.CheckReachabilityResponse:
        """Ask the coordinator to dial this peer back from a fresh libp2p node (coordinator.reachability)."""
        request = pb.CheckReachabilityRequest(peer_id=peer_id, multiaddrs=list(maddrs)[:16])
        return self.stub.CheckReachability(request, timeout=timeout)

    def leave(self, peer_id: str, round_id: str) -> None:
        request = pb.LeaveRequest(peer_id=peer_id, round_id=round_id, credential=self._credential(round_id))
        self.stub.Leave(request, timeout=self.timeout)

    def pull_adapter(self, version: str, out_dir: Path, public_key: Any) -> Path:
        """Download adapter ``version`` and verify it with the coordinator's public key before keeping it."""
        from swarm.adapter_client import pull_adapter

        target = out_dir / version
        if not target.exists():
            pull_adapter(self.channel, version, target, public_key)
        return target

    def close(self) -> None:
        self.channel.close()
