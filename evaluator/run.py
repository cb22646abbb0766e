"""The evaluator loop: when the coordinator names a candidate, measure it and the round's start, report both.

It trusts nothing it did not check: the round spec must carry the coordinator's signature over this
call's nonce, the candidate's bytes must hash to the sha256 the coordinator named, the parent adapter
must carry the coordinator's signature and the round's base fingerprint, and the local base model must
have that fingerprint.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from pathlib import Path

import grpc
import torch
from safetensors.torch import load as load_safetensors

from evaluator.config import EvaluatorConfig
from evaluator.measure import adapter_loss, held_out
from swarm import __version__
from swarm.config import RoundSpec
from swarm.identity import join_payload, load_or_create_identity
from swarm.keys import load_public_key, verified_spec_json
from swarm.proto import CANDIDATE_PREFIX, EVALUATOR_ROLE, ROUND_START, RoundState
from swarm.proto import coordinator_pb2 as pb
from swarm.proto import coordinator_pb2_grpc as pb_grpc
from swarm.tls import channel

log = logging.getLogger(__name__)
RPC_TIMEOUT = 30.0


class Evaluator:
    """One evaluator's session with one coordinator; :meth:`step` is one pass, :meth:`run` loops."""

    def __init__(self, config: EvaluatorConfig) -> None:
        self.config = config
        self.identity = load_or_create_identity(config.identity_path)
        self.public_key = load_public_key(config.coordinator_public_key)
        options = [("grpc.max_receive_message_length", 512 << 20)]
        self.channel = channel(config.coordinator, config.coordinator_cert or None, options)
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.credential = ""
        self.done: set[str] = set()  # candidates already reported
        self.work = Path(config.work_dir or tempfile.mkdtemp(prefix="loraswarm-evaluator-"))

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    def join(self) -> None:
        challenge = self.stub.GetRoundSpec(pb.GetRoundSpecRequest(), timeout=RPC_TIMEOUT).join_challenge
        req = pb.JoinRequest(peer_id=self.peer_id, role=EVALUATOR_ROLE, software_version=__version__,
                             public_key=self.identity.public_key_pb, challenge=challenge)  # fmt: skip
        req.signature = self.identity.sign(join_payload(req.peer_id, "", challenge, "", []))
        self.credential = self.stub.Join(req, timeout=RPC_TIMEOUT).credential

    def candidate(self, sha256: str) -> dict[str, torch.Tensor]:
        """The candidate's tensors, downloaded and checked against the sha256 the coordinator named."""
        request = pb.DownloadAdapterRequest(version=CANDIDATE_PREFIX + sha256)
        data = b"".join(c.data for c in self.stub.DownloadAdapter(request, timeout=RPC_TIMEOUT * 10))
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError(f"the candidate's bytes do not hash to {sha256}: refusing to evaluate them")
        return load_safetensors(data)

    def round_start(self, spec: RoundSpec) -> dict[str, torch.Tensor] | None:
        """The round's parent adapter, verified with the coordinator's key (None = the bare base model)."""
        if not spec.parent_adapter:
            return None
        from swarm.adapter import check_base, load_adapter_tensors
        from swarm.adapter_client import pull_adapter

        key = self.public_key
        folder = self.work / "adapters" / spec.parent_adapter
        if not folder.exists():
            pull_adapter(self.channel, spec.parent_adapter, folder, key)
        manifest, tensors = load_adapter_tensors(folder, key)
        check_base(manifest, spec.base.fingerprint)
        return tensors

    def measure(self, spec: RoundSpec, sha256: str) -> tuple[float, float, int]:
        """``(loss at the round's start, loss of the candidate, tokens)`` on the held-out data."""
        from transformers import AutoTokenizer

        from swarm.checkpoint import fingerprint

        if spec.base.fingerprint and fingerprint(spec.base.path) != spec.base.fingerprint:
            raise ValueError(f"the base model at {spec.base.path} is not the round's ({spec.base.fingerprint})")
        candidate, start = self.candidate(sha256), self.round_start(spec)
        seqs = held_out(spec, AutoTokenizer.from_pretrained(spec.base.path), self.config.eval_data,
                        self.config.max_sequences)  # fmt: skip
        cfg = self.config
        before = adapter_loss(spec, start, seqs, cfg.batch_size, cfg.device)
        after = adapter_loss(spec, candidate, seqs, cfg.batch_size, cfg.device)
        return before, after, int(seqs.numel())

    def report(self, round_id: str, sha256: str, before: float, after: float, tokens: int) -> None:
        for attempt in (0, 1):
            if not self.credential:
                self.join()
            try:
                for version, loss in ((ROUND_START, before), ("", after)):
                    self.stub.ReportEval(pb.ReportEvalRequest(
                        peer_id=self.peer_id, round_id=round_id, adapter_version=version, epoch=1, eval_loss=loss,
                        eval_tokens=tokens, credential=self.credential, candidate_sha256=sha256,
                    ), timeout=RPC_TIMEOUT)  # fmt: skip
                return
            except grpc.RpcError as e:
                if e.code() is not grpc.StatusCode.UNAUTHENTICATED or attempt:
                    raise
                self.credential = ""  # the coordinator restarted: join again

    def step(self) -> str | None:
        """Evaluate the current round's candidate if there is a new one; its sha256 when reported."""
        nonce = os.urandom(16)
        info = self.stub.GetRoundSpec(pb.GetRoundSpecRequest(spec_nonce=nonce), timeout=RPC_TIMEOUT)
        sha = info.candidate_sha256
        if info.state != RoundState.FINALIZING.value or not sha or sha in self.done:
            return None
        spec = RoundSpec.from_json(verified_spec_json(self.public_key, info.round_spec_json,
                                                      info.round_spec_signature, nonce))  # fmt: skip
        before, after = self.measure(spec, sha)[:2]
        tokens = self.config.max_sequences * spec.data.seq_len
        self.report(info.round_id, sha, before, after, tokens)
        self.done.add(sha)
        log.info("round %s: candidate %s evaluated: loss %.4f at the start, %.4f after", info.round_id, sha[:12],
                 before, after)  # fmt: skip
        return sha

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.step()
            except grpc.RpcError as e:
                log.warning("coordinator call failed (%s: %s); retrying", e.code().name, e.details())
            except Exception:
                log.exception("evaluation failed; retrying")
            stop.wait(self.config.poll_s)

    def close(self) -> None:
        self.channel.close()
