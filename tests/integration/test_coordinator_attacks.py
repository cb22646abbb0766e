"""Attacks on a live coordinator on 127.0.0.1 (TLS, port 0), each refused or without effect, and the honest
round still publishes the honest adapter (SECURITY.md lists which threat each test covers)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import save

from coordinator.server import CoordinatorConfig, CoordinatorServer, serve
from coordinator.state import MemberState
from swarm.adapter import load_adapter_tensors
from swarm.config import BaseModelRef, EndCondition, RoundSpec, SpanRange
from swarm.keys import load_public_key, verified_spec_json
from swarm.proto import coordinator_pb2 as pb
from swarm.proto import coordinator_pb2_grpc as pb_grpc
from tests.identities import GrpcPeers, coordinator_channel, pid
from tests.unit.finalize_helpers import LORA, span_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]
RPC = 10.0
SPEC = RoundSpec(round_id="r1", base=BaseModelRef(path="/models/tiny", fingerprint="sha256:tiny", num_layers=2),
                 lora=LORA, spans=(SpanRange(start=0, end=2),), end=EndCondition(target_samples=64))  # fmt: skip


def poll(condition: Callable[[], object], deadline_s: float, what: str) -> object:
    deadline = time.monotonic() + deadline_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out after {deadline_s} s waiting for {what}"
        time.sleep(0.05)
    return value


def refused(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CoordinatorServer]:
    s = serve(CoordinatorConfig(host="127.0.0.1", port=0, metrics_port=0, workdir=tmp_path, round_spec=SPEC,
                                dht=False, finalize_poll_s=0.05, finalize_timeout_s=30))  # fmt: skip
    yield s
    s.stop(grace=0)


@pytest.fixture
def stub(server: CoordinatorServer) -> Iterator[pb_grpc.CoordinatorStub]:
    with coordinator_channel(server.address, server.tls_cert_path) as channel:
        yield pb_grpc.CoordinatorStub(channel)


def two_state(seed: int) -> dict[str, torch.Tensor]:
    """The LoRA state of the round's one span (blocks 0 and 1)."""
    return {**span_state(0, seed), **span_state(1, seed)}


def upload(stub: pb_grpc.CoordinatorStub, peer: str, credential: str, state: dict[str, torch.Tensor], epoch: int,
           samples: int = 5) -> pb.UploadSpanStateResponse:  # fmt: skip
    return stub.UploadSpanState(pb.UploadSpanStateRequest(
        peer_id=pid(peer), round_id="r1", span=pb.Span(start=0, end=2), epoch=epoch, safetensors=save(state),
        samples=samples, credential=credential), timeout=RPC)  # fmt: skip


def report(stub: pb_grpc.CoordinatorStub, peer: str, credential: str, loss: float, tokens: int = 640,
           epoch: int = 0, candidate: str = "") -> None:  # fmt: skip
    stub.ReportEval(pb.ReportEvalRequest(peer_id=pid(peer), round_id="r1", epoch=epoch, eval_loss=loss,
                                         eval_tokens=tokens, credential=credential, candidate_sha256=candidate),
                    timeout=RPC)  # fmt: skip


def test_outsiders_cannot_act_for_members(server: CoordinatorServer, stub: pb_grpc.CoordinatorStub) -> None:
    """The outsider of the issue: member ids are public (status page); it forges every call for one of them."""
    honest = GrpcPeers(stub, RPC, software_version="0.1.0", base_fingerprint="sha256:tiny")
    assert honest.join("a").accepted
    victim = pid("a")
    forged_join = honest.join_request("mallory", peer_id=victim)  # mallory's key, a's id
    assert refused(lambda: stub.Join(forged_join, timeout=RPC)) is grpc.StatusCode.UNAUTHENTICATED
    replay = honest.join_request("a")
    assert stub.Join(replay, timeout=RPC).accepted  # a joins again (a quick restart): a new credential
    assert refused(lambda: stub.Join(replay, timeout=RPC)) is grpc.StatusCode.UNAUTHENTICATED  # a replayed Join
    honest.credentials["a"] = stub.Join(honest.join_request("a"), timeout=RPC).credential
    for credential in ("", "stolen?"):
        assert refused(lambda c=credential: stub.Leave(pb.LeaveRequest(peer_id=victim, round_id="r1", credential=c),
                                                       timeout=RPC)) is grpc.StatusCode.UNAUTHENTICATED  # fmt: skip
        beat = pb.HeartbeatRequest(peer_id=victim, round_id="r1", credential=credential,
                                   progress=pb.Progress(samples=2**62, epoch=10**9))  # fmt: skip
        assert refused(lambda b=beat: stub.Heartbeat(b, timeout=RPC)) is grpc.StatusCode.UNAUTHENTICATED
        assert refused(lambda c=credential: upload(stub, "a", c, two_state(7), epoch=10**9)) in (
            grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip
        assert refused(lambda c=credential: report(stub, "a", c, 0.0, tokens=10**12)) is (
            grpc.StatusCode.UNAUTHENTICATED
        )
    member = server.ctx.store.get_member("r1", victim)
    assert member is not None and member.state is MemberState.LIVE and member.epoch == 0
    assert server.ctx.store.list_span_states("r1") == [] and server.ctx.store.list_eval_reports("r1") == []
    assert stub.GetRoundSpec(pb.GetRoundSpecRequest(), timeout=RPC).samples == 0
    assert honest.heartbeat("a").ok  # the member itself is untouched


def test_a_hostile_member_cannot_decide_the_round(server: CoordinatorServer, stub: pb_grpc.CoordinatorStub) -> None:
    """A hostile volunteer h among honest a and b: huge progress claims, a huge epoch, a poisoned upload and
    forged evals. The round still ends on honest progress and publishes the honest state with honest evals."""
    peers = GrpcPeers(stub, RPC, software_version="0.1.0", base_fingerprint="sha256:tiny")
    for p in ("a", "b", "h"):
        assert peers.join(p).accepted
        report(stub, p, peers.credential(p), 3.0)  # starting evals: all three may be picked as evaluators
    time.sleep(0.01)
    peers.heartbeat("h", samples=2**62, tokens=2**62, epoch=10**6)  # would end the round on main
    state = stub.GetRoundSpec(pb.GetRoundSpecRequest(), timeout=RPC)
    assert (state.state, state.epoch) == ("training", 0) and state.samples <= 32, state  # one epoch in progress
    for p in ("a", "b"):
        peers.heartbeat(p, samples=32, tokens=32 * 64, epoch=2)
    poll(lambda: stub.GetRoundSpec(pb.GetRoundSpecRequest(), timeout=RPC).state == "finalizing", 10, "the round end")
    good, poison = two_state(0), {k: v * 100 for k, v in two_state(0).items()}
    upload(stub, "h", peers.credential("h"), poison, epoch=10**6)  # alone at its epoch: outvoted by a and b
    upload(stub, "h", peers.credential("h"), poison, epoch=2)  # and outvoted at the honest epoch too
    upload(stub, "a", peers.credential("a"), good, epoch=2)
    upload(stub, "b", peers.credential("b"), good, epoch=2)
    progress = {"a": dict(samples=32, tokens=32 * 64, epoch=2), "b": dict(samples=32, tokens=32 * 64, epoch=2),
                "h": dict(samples=2**62, tokens=2**62, epoch=10**6)}  # fmt: skip
    sha = poll(lambda: peers.heartbeat("a", **progress["a"]).eval_candidate_sha256, 20, "the candidate")
    assert {peers.heartbeat(p, **progress[p]).eval_candidate_sha256 for p in ("b", "h")} == {sha}
    report(stub, "h", peers.credential("h"), 0.0, tokens=10**12, epoch=3, candidate=sha)  # a lie
    for p in ("a", "b"):
        report(stub, p, peers.credential(p), 2.0, epoch=3, candidate=sha)
    poll(lambda: server.ctx.store.list_adapters(), 20, "the published adapter")
    [adapter] = server.ctx.store.list_adapters()
    manifest, tensors = load_adapter_tensors(adapter.path, load_public_key(server.public_key_path))
    assert all(torch.equal(tensors[k], v) for k, v in good.items())
    assert (manifest.eval_loss_before, manifest.eval_loss_after) == (3.0, 2.0)  # medians: the lie moved nothing
    record = server.ctx.store.get_round("r1")
    assert record is not None and f"outvoted {pid('h')}" in record.reason  # the hostile replica is named
    contributions = {c.peer_id: c.samples for c in server.ctx.store.list_contributions("r1")}
    assert contributions[pid("h")] < 1000  # capped at max_samples_per_s for the time it was a member


def test_a_member_cannot_upload_another_span(tmp_path: Path) -> None:
    spec = SPEC.model_copy(update={"spans": (SpanRange(start=0, end=1), SpanRange(start=1, end=2))})
    server = serve(CoordinatorConfig(host="127.0.0.1", port=0, metrics_port=None, workdir=tmp_path, round_spec=spec,
                                     dht=False))  # fmt: skip
    try:
        with coordinator_channel(server.address, server.tls_cert_path) as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            peers = GrpcPeers(stub, RPC, software_version="0.1.0", base_fingerprint="sha256:tiny")
            assert peers.join("a").span.start == 0 and peers.join("b").span.start == 1
            req = pb.UploadSpanStateRequest(
                peer_id=pid("a"),
                round_id="r1",
                span=pb.Span(start=1, end=2),
                epoch=0,
                safetensors=save(span_state(1)),
                credential=peers.credential("a"),
            )
            assert refused(lambda: stub.UploadSpanState(req, timeout=RPC)) is grpc.StatusCode.PERMISSION_DENIED
            assert server.ctx.store.list_span_states("r1") == []
    finally:
        server.stop(grace=0)


def test_plaintext_clients_cannot_talk_to_a_tls_coordinator(server: CoordinatorServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        code = refused(lambda: pb_grpc.CoordinatorStub(channel).GetRoundSpec(pb.GetRoundSpecRequest(), timeout=3))
    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    other = Path(server.config.state_dir.parent / "other-cert")
    from swarm.tls import ensure_certificate

    ensure_certificate(other / "cert.pem", other / "key.pem")  # an impostor's certificate is not the pinned one
    with coordinator_channel(server.address, other / "cert.pem") as channel:
        code = refused(lambda: pb_grpc.CoordinatorStub(channel).GetRoundSpec(pb.GetRoundSpecRequest(), timeout=3))
    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_the_peer_client_joins_signed_and_checks_the_spec_signature(server: CoordinatorServer) -> None:
    """The real client: signed Join, credential kept and attached by itself, spec signature checked; a spec is
    signed over the asker's nonce, so an older answer replayed does not verify."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from peer.coordinator_client import CoordinatorClient
    from tests.identities import identity

    key = load_public_key(server.public_key_path)
    client = CoordinatorClient(server.address, identity=identity("a"), cert=server.tls_cert_path, public_key=key)
    try:
        spec, span, reply = client.join(pid("a"), [], "sha256:tiny", 1.0, "cpu", 1 << 30)
        assert spec == SPEC and reply.credential and client.credentials["r1"] == reply.credential
        time.sleep(0.01)
        beat = client.heartbeat(pid("a"), "r1", span, samples=1, tokens=64, loss=2.0, throughput=1.0, epoch=0)
        assert beat.ok and beat.action == "continue"
        with pytest.raises(ValueError, match="needs that peer's identity key"):
            client.join(pid("b"), [], "sha256:tiny", 1.0, "cpu", 1 << 30)
    finally:
        client.close()
    with coordinator_channel(server.address, server.tls_cert_path) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        old = stub.GetRoundSpec(pb.GetRoundSpecRequest(spec_nonce=b"first call"), timeout=5)
        assert verified_spec_json(key, old.round_spec_json, old.round_spec_signature, b"first call")
        with pytest.raises(ValueError, match="replayed"):  # an older answer replayed to a later call
            verified_spec_json(key, old.round_spec_json, old.round_spec_signature, b"a later call")
        with pytest.raises(grpc.RpcError) as err:
            stub.GetRoundSpec(pb.GetRoundSpecRequest(spec_nonce=bytes(65)), timeout=5)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "spec_nonce" in (err.value.details() or "")
    impostor = CoordinatorClient(server.address, cert=server.tls_cert_path,
                                 public_key=Ed25519PrivateKey.generate().public_key())  # fmt: skip
    try:
        with pytest.raises(ValueError, match="signature"):
            impostor.current_spec()  # signed by another key than the one this client trusts
    finally:
        impostor.close()
