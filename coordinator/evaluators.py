"""Evaluators the operator runs: they join without a span and alone decide the eval gate.

An evaluator is a libp2p identity the operator lists (``evaluator_ids``). It joins with
``role="evaluator"`` and the same identity proof as a member; it gets a credential (kept in memory:
after a coordinator restart it joins again) but no span. It downloads the candidate adapter named in
``GetRoundSpecResponse.candidate_sha256``, loads base + candidate itself, and reports the held-out
loss of the candidate and of the round's starting point, both naming the candidate's sha256
(:mod:`coordinator.eval_gate`). The coordinator process itself never loads base-model weights.
"""

from __future__ import annotations

import hmac

import grpc

from coordinator.auth import credential_digest, new_credential, unauthenticated, verify_join
from coordinator.context import CoordinatorContext
from coordinator.validation import HandlerError
from swarm.proto import coordinator_pb2 as pb


def join_evaluator(ctx: CoordinatorContext, req: pb.JoinRequest) -> pb.JoinResponse:
    """Admit one of the operator's evaluators (PERMISSION_DENIED for any other peer id)."""
    if req.peer_id not in ctx.config.evaluator_ids:
        raise HandlerError(grpc.StatusCode.PERMISSION_DENIED,
                           f"peer {req.peer_id[:64]} is not one of this coordinator's evaluators (--evaluator-id)")  # fmt: skip
    verify_join(ctx.challenges, req)
    credential, digest = new_credential()
    with ctx.lock:
        ctx.evaluator_credentials[req.peer_id] = digest
        current = ctx.store.current_round()
    return pb.JoinResponse(
        accepted=True,
        round_id=current.round_id if current else "",
        round_spec_json=current.spec_json if current else "",
        heartbeat_interval_s=ctx.config.heartbeat_interval_s,
        credential=credential,
        round_spec_signature=ctx.spec_signature(current.spec_json, req.spec_nonce) if current else "",
    )


def check_evaluator(ctx: CoordinatorContext, peer_id: str, credential: str) -> None:
    """UNAUTHENTICATED unless ``credential`` is the one ``peer_id``'s evaluator Join returned."""
    digest = ctx.evaluator_credentials.get(peer_id, "")
    if not (digest and credential and hmac.compare_digest(credential_digest(credential), digest)):
        raise unauthenticated(f"credential for evaluator {peer_id[:64]} is missing or wrong: Join as an evaluator")
