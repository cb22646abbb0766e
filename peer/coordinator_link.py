"""Keeps a running peer in step with the coordinator: heartbeats, evals, span upload at finalize, round changes."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import grpc
import torch
from hivemind.utils.logging import get_logger

from peer.config import PeerConfig
from peer.coordinator_client import CoordinatorClient
from peer.server import SpanServer
from peer.stats import PeerStats, RoundSignals
from swarm.config import RoundSpec

log = get_logger(__name__)


class CoordinatorLink:
    """One round's membership: a heartbeat thread driving the daemon by the coordinator's actions."""

    def __init__(self, client: CoordinatorClient, config: PeerConfig, peer_id: str, spec: RoundSpec, fingerprint: str):
        self.client, self.config, self.peer_id, self.spec, self.fingerprint = client, config, peer_id, spec, fingerprint
        self.server: SpanServer | None = None
        self.stats, self.signals = PeerStats(), RoundSignals()
        self.interval = 2.0
        self._uploaded_epoch = -1
        self._uploader: threading.Thread | None = None
        self._final_eval: tuple[float, int, int] | None = None  # (loss, epoch, tokens) of the final eval
        self._candidate, self._named = "", ""  # candidate sha256 this peer must evaluate / has reported on
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="coordinator-heartbeat", daemon=True)

    def parent_state(self) -> dict[str, torch.Tensor] | None:
        """The round's starting adapter, downloaded and verified (signature, hash, base model) before loading."""
        if not self.spec.parent_adapter:
            return None
        from swarm.adapter import check_base, load_adapter_tensors
        from swarm.keys import load_public_key

        public_key = load_public_key(self.config.coordinator_public_key)
        cache = Path(tempfile.gettempdir()) / "loraswarm-adapters" / self.peer_id
        folder = self.client.pull_adapter(self.spec.parent_adapter, cache, public_key)
        manifest, tensors = load_adapter_tensors(folder, public_key)
        check_base(manifest, self.fingerprint)
        log.info(f"Starting from verified adapter {manifest.version} (parent {manifest.parent_version})")
        return tensors

    def attach(self, server: SpanServer | None, stats: PeerStats, signals: RoundSignals, interval: float) -> None:
        """What the link needs of its peer: the span (state to upload, epoch; None for a trainer-only peer), what it
        did, and how to stop it.

        The peer calls :meth:`report_eval` after each held-out evaluation.
        """
        self.server, self.stats, self.signals, self.interval = server, stats, signals, interval

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def report_eval(self, phase: str, loss: float, epoch: int, tokens: int) -> None:
        try:
            self.client.report_eval(self.peer_id, self.spec.round_id, 0 if phase == "before" else epoch, loss, tokens)
        except grpc.RpcError as exc:
            log.warning(f"could not report the {phase} eval to the coordinator: {exc.details()}")
        if phase != "before":
            self._final_eval = (loss, epoch, tokens)
            self._name_candidate()

    def _name_candidate(self) -> None:
        """As a picked evaluator: report the final eval on the candidate the coordinator named.

        The trainer measured the swarm's final state, which the candidate was assembled from; an evaluator
        that loads base + candidate itself is the stronger check (SECURITY.md).
        """
        if not self._candidate or self._candidate == self._named or self._final_eval is None:
            return
        loss, epoch, tokens = self._final_eval
        try:
            self.client.report_eval(self.peer_id, self.spec.round_id, max(epoch, 1), loss, tokens, self._candidate)
            self._named = self._candidate
        except grpc.RpcError as exc:
            log.warning(f"could not report the eval of candidate {self._candidate[:12]}: {exc.details()}")

    def _upload(self, epoch: int) -> None:
        server = self.server
        assert server is not None
        state = server.lora_state()
        samples = max(server.samples_trained, self.stats.samples)
        self.client.upload_span_state(self.peer_id, self.spec.round_id, server.span, epoch, state, samples)
        self._uploaded_epoch = epoch
        log.info(f"Uploaded span {server.span.name} at epoch {epoch}")

    def _upload_safely(self, epoch: int) -> None:
        try:
            self._upload(epoch)
        except grpc.RpcError as exc:
            log.warning(f"span upload failed ({exc.code().name}: {exc.details()}); retrying on the next heartbeat")
        except Exception:
            log.exception("span upload failed; retrying on the next heartbeat")

    def _beat(self) -> None:
        server, stats, signals = self.server, self.stats, self.signals
        span = server.span if server is not None else None
        suspects = dict(server.group.suspects) if server is not None else {}
        resp = self.client.heartbeat(
            self.peer_id,
            self.spec.round_id,
            span,
            samples=stats.samples,
            tokens=stats.tokens,
            loss=stats.last_loss,
            throughput=stats.throughput,
            epoch=server.epoch if server is not None else 0,
            accusations={**suspects, **stats.caught},  # members caught sending bad data
        )
        if resp.eval_candidate_sha256:
            self._candidate = resp.eval_candidate_sha256
            self._name_candidate()
        if resp.heartbeat_interval_s:
            self.interval = resp.heartbeat_interval_s
        if resp.action == "finalize":
            signals.finalize.set()
            busy = self._uploader is not None and self._uploader.is_alive()
            if server is not None and server.epoch != self._uploaded_epoch and not busy:
                # Off the heartbeat thread: reading the state waits for the span lock (an all-reduce may hold it)
                # and heartbeats must keep flowing meanwhile.
                self._uploader = threading.Thread(
                    target=self._upload_safely, args=(server.epoch,), name="span-upload", daemon=True
                )
                self._uploader.start()
        elif span is not None and resp.HasField("span") and (resp.span.start, resp.span.end) != (span.start, span.end):
            # Rebalanced (a span lost its last server): leave this span and Join again to load the new one.
            log.info(f"The coordinator moved this peer to span {resp.span.start}-{resp.span.end}: reloading")
            signals.finalize.set()
            signals.round_over.set()
            self._stop.set()
        elif resp.action in ("rejoin", "stop") or not resp.ok:
            log.info(f"Round {self.spec.round_id} is over for this peer ({resp.action}: {resp.message})")
            signals.finalize.set()
            signals.round_over.set()
            self._stop.set()

    def _loop(self) -> None:
        failures = 0
        while not self._stop.wait(self.interval):
            try:
                self._beat()
                failures = 0
            except grpc.RpcError as exc:  # the coordinator may be restarting: keep serving, retry
                failures += 1
                if failures in (1, 10) or failures % 60 == 0:
                    log.warning(f"heartbeat failed ({exc.code().name}: {exc.details()}); retrying")
            except Exception:
                log.exception("heartbeat handling failed; retrying")
