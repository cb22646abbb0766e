"""A coordinator context driven through its plain handlers, for finalization tests (no sockets)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save

from coordinator import handlers, handlers_data
from coordinator.config import CoordinatorConfig
from coordinator.context import CoordinatorContext
from coordinator.publish import continue_series
from coordinator.state import Candidate
from swarm.adapter import lora_key
from swarm.config import BaseModelRef, EndCondition, LoraSettings, RoundSpec, split_even
from swarm.keys import load_or_create_signing_key
from swarm.proto import coordinator_pb2 as pb
from tests.identities import Peers, pid

LORA = LoraSettings(rank=4, alpha=8, target_modules=("q_proj", "v_proj"))
SHAPES = {"q_proj": (32, 32), "v_proj": (16, 32)}  # (out, in) of a tiny llama block: v_proj is not square
SPEC = RoundSpec(round_id="r1", base=BaseModelRef(path="/models/tiny", fingerprint="sha256:tiny", num_layers=2),
                 lora=LORA, spans=split_even(2, 2), end=EndCondition(target_samples=10))  # fmt: skip


def span_state(span: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """LoRA tensors of span ``span`` (block ``span``: the spec has one block per span)."""
    g = torch.Generator().manual_seed(seed * 10 + span)
    out = {}
    for module, (o, i) in SHAPES.items():
        out[lora_key(span, module, "A")] = torch.randn(LORA.rank, i, generator=g)
        out[lora_key(span, module, "B")] = torch.randn(o, LORA.rank, generator=g)
    return out


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Swarm:
    """A context with the round of :data:`SPEC` open; methods act as peers would over gRPC."""

    def __init__(self, tmp_path: Path, store: str = "memory", spec: RoundSpec = SPEC, **config: object) -> None:
        self.clock = Clock()
        fields: dict = dict(workdir=tmp_path, store=store, round_spec=spec, finalize_timeout_s=30.0)
        fields.update(config)
        self.config = CoordinatorConfig(**fields)
        self.ctx = CoordinatorContext.from_config(self.config, self.clock)
        self.key = load_or_create_signing_key(self.config.signing_key_path)
        self.peers = Peers(self.ctx, software_version="0.1.0", base_fingerprint="sha256:tiny")
        continue_series(self.ctx, self.clock())

    @property
    def round_id(self) -> str:
        record = self.ctx.store.current_round()
        assert record is not None
        return record.round_id

    def join(self, peer: str) -> int:
        reply = self.peers.join(peer)
        assert reply.accepted, reply.reject_reason
        return reply.span.start

    def beat(self, peer: str, samples: int = 0, epoch: int = 0, round_id: str = "") -> pb.HeartbeatResponse:
        progress = pb.Progress(samples=samples, tokens=samples * 64, epoch=epoch)
        return handlers.heartbeat(self.ctx, pb.HeartbeatRequest(peer_id=pid(peer), round_id=round_id or self.round_id,
                                                                progress=progress,
                                                                credential=self.peers.credential(peer)))  # fmt: skip

    def upload(self, peer: str, span: int, state: dict[str, torch.Tensor], epoch: int = 3, samples: int = 5) -> None:
        req = pb.UploadSpanStateRequest(peer_id=pid(peer), round_id=self.round_id,
                                        span=pb.Span(start=span, end=span + 1), epoch=epoch, safetensors=save(state),
                                        samples=samples, credential=self.peers.credential(peer))  # fmt: skip
        handlers_data.upload_span_state(self.ctx, req)

    def report(self, peer: str, epoch: int, loss: float, tokens: int = 100, candidate: str = "") -> None:
        req = pb.ReportEvalRequest(peer_id=pid(peer), round_id=self.round_id, epoch=epoch, eval_loss=loss,
                                   eval_tokens=tokens, credential=self.peers.credential(peer),
                                   candidate_sha256=candidate)  # fmt: skip
        handlers_data.report_eval(self.ctx, req)

    @property
    def candidate(self) -> Candidate:
        """The candidate the coordinator assembled for the current round (after a finalize pass found every span)."""
        return self.ctx.candidates[self.round_id]

    def evaluate(self, peer: str, loss: float) -> None:
        """``peer`` reports its held-out loss of the candidate, naming it (what a picked evaluator does)."""
        self.report(peer, 3, loss, candidate=self.candidate.sha256)

    def train(self, peers: dict[str, int], before: dict[str, float], epoch: int = 3) -> None:
        """Join ``peers`` (peer -> expected span), report the starting evals, heartbeat until finalizing."""
        for peer, span in peers.items():
            assert self.join(peer) == span
        for peer, loss in before.items():
            self.report(peer, 0, loss)
        self.clock.now += 5
        for peer in peers:
            self.beat(peer, samples=5, epoch=epoch)
        assert self.beat(next(iter(peers)), samples=5, epoch=epoch).action == "finalize"
