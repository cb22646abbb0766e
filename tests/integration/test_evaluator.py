"""The operator's evaluator against a live coordinator on 127.0.0.1 (TLS): it loads base + candidate itself,
so an honest round publishes an adapter that lowers held-out loss, and a poisoned upload is refused however
the members report; members' own eval reports count for nothing."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from coordinator.server import CoordinatorConfig, CoordinatorServer, serve
from evaluator.config import EvaluatorConfig
from evaluator.measure import adapter_loss, held_out
from evaluator.run import Evaluator
from swarm.adapter import load_adapter_tensors, split_by_span
from swarm.config import RoundSpec
from swarm.identity import load_or_create_identity
from swarm.keys import load_public_key
from swarm.proto import coordinator_pb2 as pb
from swarm.proto import coordinator_pb2_grpc as pb_grpc
from tests.identities import GrpcPeers, coordinator_channel, pid
from tests.integration.harness import make_spec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
RPC = 10.0


def trained_lora(spec: RoundSpec, steps: int = 40) -> dict[str, torch.Tensor]:
    """LoRA tensors (PEFT keys) trained centrally for a few steps: a candidate that really helps."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swarm.data import load_round_data

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(spec.base.path), LoraConfig(
        r=spec.lora.rank, lora_alpha=spec.lora.alpha, lora_dropout=0.0, target_modules=list(spec.lora.target_modules)))  # fmt: skip
    train, _ = load_round_data(spec.data, AutoTokenizer.from_pretrained(spec.base.path))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        batch = train[(step * 8) % max(len(train) - 8, 1) :][:8]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def drive(server: CoordinatorServer, spec: RoundSpec, pieces: list[dict[str, torch.Tensor]], evaluator: Evaluator,
          member_lie: float) -> str:  # fmt: skip
    """Members a (span 0) and b (span 1) train, upload ``pieces`` and report a fake final loss; the
    evaluator evaluates the candidate. Returns the round's final state."""
    with coordinator_channel(server.address, server.tls_cert_path) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        peers = GrpcPeers(stub, RPC, software_version="0.1.0", base_fingerprint=spec.base.fingerprint)
        spans = {p: peers.join(p).span for p in ("a", "b")}
        for p in spans:
            stub.ReportEval(pb.ReportEvalRequest(peer_id=pid(p), round_id=spec.round_id, epoch=0, eval_loss=9.0,
                                                 eval_tokens=64, credential=peers.credential(p)), timeout=RPC)  # fmt: skip
        time.sleep(0.05)
        for p in spans:
            peers.heartbeat(p, round_id=spec.round_id, samples=40, tokens=40 * 64, epoch=3)
        assert stub.GetRoundSpec(pb.GetRoundSpecRequest(), timeout=RPC).state == "finalizing"
        for (p, span), piece in zip(spans.items(), pieces, strict=True):
            stub.UploadSpanState(pb.UploadSpanStateRequest(
                peer_id=pid(p), round_id=spec.round_id, span=span, epoch=3, safetensors=save(piece), samples=40,
                credential=peers.credential(p)), timeout=RPC)  # fmt: skip
        sha = poll(lambda: stub.GetRoundSpec(pb.GetRoundSpecRequest(), timeout=RPC).candidate_sha256, "a candidate")
        for p in spans:  # members' own reports on the candidate: a lie that must count for nothing
            stub.ReportEval(pb.ReportEvalRequest(peer_id=pid(p), round_id=spec.round_id, epoch=3, eval_loss=member_lie,
                                                 eval_tokens=10**9, credential=peers.credential(p),
                                                 candidate_sha256=sha), timeout=RPC)  # fmt: skip
        assert evaluator.step() == sha
        return str(poll(lambda: _ended(stub, spec.round_id), "the round to end"))


def _ended(stub: pb_grpc.CoordinatorStub, round_id: str) -> str:
    state = stub.GetRoundSpec(pb.GetRoundSpecRequest(round_id=round_id), timeout=RPC).state
    return state if state in ("published", "failed") else ""


def poll(condition: Callable[[], object], what: str, deadline_s: float = 30.0) -> object:
    deadline = time.monotonic() + deadline_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def start(tmp_path: Path, spec: RoundSpec) -> tuple[CoordinatorServer, Evaluator]:
    identity = tmp_path / "evaluator.key"
    evaluator_id = load_or_create_identity(identity).peer_id
    server = serve(CoordinatorConfig(host="127.0.0.1", port=0, metrics_port=None, workdir=tmp_path / "coord",
                                     round_spec=spec, dht=False, finalize_poll_s=0.05, finalize_timeout_s=60,
                                     evaluator_ids=(evaluator_id,)))  # fmt: skip
    evaluator = Evaluator(EvaluatorConfig(
        coordinator=server.address, coordinator_public_key=str(server.public_key_path),
        coordinator_cert=str(server.tls_cert_path), identity_path=str(identity), max_sequences=32,
        work_dir=str(tmp_path / "evaluator")))  # fmt: skip
    return server, evaluator


def test_the_evaluator_gates_on_what_it_measured(tmp_path: Path, demo_base: Path, demo_data: Path) -> None:
    spec = make_spec(demo_base, demo_data, "r1", [0, 2, 4], epochs=3)
    trained = trained_lora(spec)
    server, evaluator = start(tmp_path / "honest", spec)
    try:
        assert drive(server, spec, split_by_span(trained, spec.spans), evaluator, member_lie=50.0) == "published"
        [adapter] = server.ctx.store.list_adapters()
        manifest, tensors = load_adapter_tensors(adapter.path, load_public_key(server.public_key_path))
        assert all(torch.equal(tensors[k], v) for k, v in trained.items())
    finally:
        evaluator.close()
        server.stop(grace=0)
    from transformers import AutoTokenizer

    seqs = held_out(spec, AutoTokenizer.from_pretrained(spec.base.path), "", 32)
    base_loss, tuned_loss = adapter_loss(spec, None, seqs, 16, "cpu"), adapter_loss(spec, trained, seqs, 16, "cpu")
    assert tuned_loss < base_loss  # the adapter really helps
    assert (manifest.eval_loss_before, manifest.eval_loss_after) == pytest.approx((base_loss, tuned_loss))

    poisoned = {k: v * 100 for k, v in trained.items()}  # a hostile span server uploads other weights than it serves
    server, evaluator = start(tmp_path / "poisoned", spec)
    try:
        assert drive(server, spec, split_by_span(poisoned, spec.spans), evaluator, member_lie=0.0) == "failed"
        record = server.ctx.store.get_round("r1")
        assert record is not None and record.reason.startswith("worse_than_parent")
        assert server.ctx.store.list_adapters() == []
    finally:
        evaluator.close()
        server.stop(grace=0)
