"""The peer's side of the coordinator API (gRPC): join, heartbeat, upload span state, report eval, adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import torch
from safetensors.torch import save

from swarm import __version__
from swarm.config import RoundSpec, SpanRange
from swarm.proto import coordinator_pb2 as pb
from swarm.proto import coordinator_pb2_grpc as pb_grpc

MAX_MESSAGE = 64 * 1024 * 1024


class JoinRejectedError(ValueError):
    """The coordinator refused this peer; the message says what to do, ``code`` says why (machine-readable)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code

    @property
    def retriable(self) -> bool:
        """A closed round is worth waiting out; a wrong base, version or token is not."""
        return self.code == "round_closed"


class CoordinatorClient:
    """Thin synchronous client; every call has a deadline and raises ``grpc.RpcError`` on transport errors."""

    def __init__(self, address: str, join_token: str = "", timeout: float = 15.0):
        self.address, self.join_token, self.timeout = address, join_token, timeout
        self.channel = grpc.insecure_channel(
            address,
            options=[("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)],
        )
        self.stub = pb_grpc.CoordinatorStub(self.channel)

    def current_spec(self) -> RoundSpec:
        resp = self.stub.GetRoundSpec(pb.GetRoundSpecRequest(), timeout=self.timeout)
        return RoundSpec.from_json(resp.round_spec_json)

    def join(
        self,
        peer_id: str,
        maddrs: list[str],
        fingerprint: str,
        throughput: float,
        device: str,
        memory_bytes: int,
        round_id: str = "",
    ) -> tuple[RoundSpec, SpanRange, pb.JoinResponse]:
        resp = self.stub.Join(
            pb.JoinRequest(
                peer_id=peer_id,
                multiaddrs=maddrs,
                base_fingerprint=fingerprint,
                software_version=__version__,
                join_token=self.join_token,
                round_id=round_id,
                capacity=pb.Capacity(memory_bytes=memory_bytes, device=device, throughput=throughput),
            ),
            timeout=self.timeout,
        )
        if not resp.accepted:
            raise JoinRejectedError(
                f"the coordinator refused to let this peer join: {resp.reject_reason}", resp.reject_code
            )
        return RoundSpec.from_json(resp.round_spec_json), SpanRange(start=resp.span.start, end=resp.span.end), resp

    def heartbeat(
        self,
        peer_id: str,
        round_id: str,
        span: SpanRange,
        *,
        samples: int,
        tokens: int,
        loss: float,
        throughput: float,
        epoch: int,
    ) -> pb.HeartbeatResponse:
        return self.stub.Heartbeat(
            pb.HeartbeatRequest(
                peer_id=peer_id,
                round_id=round_id,
                span=pb.Span(start=span.start, end=span.end),
                progress=pb.Progress(samples=samples, tokens=tokens, loss=loss, throughput=throughput, epoch=epoch),
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
            ),
            timeout=self.timeout * 4,
        )

    def report_eval(self, peer_id: str, round_id: str, epoch: int, loss: float, tokens: int) -> None:
        self.stub.ReportEval(
            pb.ReportEvalRequest(peer_id=peer_id, round_id=round_id, epoch=epoch, eval_loss=loss, eval_tokens=tokens),
            timeout=self.timeout,
        )

    def leave(self, peer_id: str, round_id: str) -> None:
        self.stub.Leave(pb.LeaveRequest(peer_id=peer_id, round_id=round_id), timeout=self.timeout)

    def pull_adapter(self, version: str, out_dir: Path, public_key: Any) -> Path:
        """Download adapter ``version`` and verify it with the coordinator's public key before keeping it."""
        from swarm.adapter_client import pull_adapter

        target = out_dir / version
        if not target.exists():
            pull_adapter(self.channel, version, target, public_key)
        return target

    def close(self) -> None:
        self.channel.close()
