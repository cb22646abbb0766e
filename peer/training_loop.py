"""The trainer role's loop: held-out eval, micro-batches through the chain until the round's end condition."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from concurrent.futures import Future

import torch
from hivemind.utils.logging import get_logger

from peer.daemon import PeerDaemon
from peer.trainer import ChainTrainer, Router, SpanUnavailableError, StepResult, in_flight
from swarm.checkpoint import resolve_checkpoint
from swarm.data import batches, load_round_data
from swarm.span import load_trainer_head

log = get_logger(__name__)


class TrainingLoop:
    """Drives this peer's data shard through the swarm and reports progress to metrics and the event log."""

    def __init__(self, daemon: PeerDaemon):
        from transformers import AutoTokenizer

        self.daemon = daemon
        cfg, spec = daemon.config, daemon.spec
        tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(spec.base.path))
        settings = spec.data.model_copy(update={"train_path": cfg.data_path}) if cfg.data_path else spec.data
        if not settings.train_path:
            raise ValueError("the trainer needs data: pass --data FILE or set data.train_path in the round spec")
        self.train, held_out = load_round_data(settings, tokenizer, cfg.shard_index, cfg.num_shards)
        self.eval_set = held_out[: cfg.eval_batches * settings.micro_batch_size]
        head = load_trainer_head(spec.base.path, dtype=daemon.dtype, device=daemon.device)
        self.router = Router(
            daemon.dht,
            spec,
            {daemon.span: daemon.server},
            timeout=cfg.request_timeout,
            rng=random.Random(cfg.seed),
            stop=daemon.stop_event,
        )
        self.trainer = ChainTrainer(
            spec, head, self.router, say=log.info, on_wire=daemon.metrics.wire, on_failover=daemon.metrics.failovers.inc
        )
        self.started = time.monotonic()
        self.steps = 0

    def evaluate(self, phase: str) -> float | None:
        """Held-out loss through the chain; waits (and says so) while a span has no server. None if stopped."""
        while True:
            try:
                loss = self.trainer.evaluate(
                    self.eval_set.to(self.daemon.device), self.daemon.spec.data.micro_batch_size
                )
                break
            except SpanUnavailableError as exc:
                if self.daemon.stop_event.is_set():
                    return None
                log.warning(f"{exc}; retrying the {phase} evaluation")
        self.daemon.metrics.eval_loss.set(loss)
        self.daemon.events.write(
            "eval",
            phase=phase,
            loss=loss,
            epoch=self.daemon.server.epoch,
            tokens=int(self.eval_set.numel()),
            samples=self.steps * self.daemon.spec.data.micro_batch_size,
        )
        for callback in self.daemon.on_eval:
            callback(phase, loss, self.daemon.server.epoch, int(self.eval_set.numel()))
        log.info(f"Held-out loss ({phase}, epoch {self.daemon.server.epoch}): {loss:.4f}")
        return loss

    def done(self, submitted: int | None = None) -> bool:
        """The round's end condition (or a stop) is reached; ``submitted`` counts micro-batches already started."""
        spec, cfg, server = self.daemon.spec, self.daemon.config, self.daemon.server
        steps = self.steps if submitted is None else submitted
        if cfg.coordinator:  # the coordinator decides when the round ends (heartbeat action "finalize")
            return bool(
                self.daemon.stop_event.is_set()
                or self.daemon.finalize_event.is_set()
                or (cfg.max_steps and steps >= cfg.max_steps)
            )
        end = spec.end
        target_epochs = end.target_epochs or (
            -(-end.target_samples // spec.optimizer.target_batch_size) if end.target_samples else 0
        )
        return bool(
            self.daemon.stop_event.is_set()
            or self.daemon.finalize_event.is_set()
            or (cfg.max_steps and steps >= cfg.max_steps)
            or (target_epochs and server.epoch >= target_epochs)
            or (end.deadline_s and time.monotonic() - self.started >= end.deadline_s)
        )

    def record(self, result: StepResult) -> None:
        m = self.daemon.metrics
        self.daemon.trained_samples += result.samples
        self.daemon.trained_tokens += result.tokens
        self.daemon.last_loss = result.loss
        m.samples.inc(result.samples)
        m.tokens.inc(result.tokens)
        m.loss.set(result.loss)
        m.step_seconds.observe(result.seconds)
        m.set_peers_seen(self.router.peers_seen())

    def wait_for_replicas(self) -> None:
        """Wait (saying so) until every span has ``--min-replicas`` announced servers, e.g. for a fixed-size job."""
        want, said = self.daemon.config.min_replicas, False
        while want > 1 and not self.daemon.stop_event.is_set():
            self.router.refresh(force=True)
            seen = self.router.peers_seen()
            short = [s.name for s in self.daemon.spec.spans if seen.get(s.name, 0) < want]
            if not short:
                return  # every announced replica joins its group's all-reduces (see peer.server)
            if not said:
                log.info(f"waiting for {want} servers of every span before training (short: {', '.join(short)})")
                said = True
            self.daemon.stop_event.wait(1.0)

    def run(self) -> None:
        self.wait_for_replicas()
        self.evaluate("before")
        self.train_until_done()
        if not self.daemon.stop_event.is_set():
            with torch.no_grad():
                self.evaluate("after")

    def train_until_done(self) -> None:
        """Micro-batches through the chain, ``--pipeline-depth`` of them in flight, until the round's end."""
        device = self.daemon.device
        for future in in_flight(
            self.trainer.step,
            (batch.to(device) for batch in self._batches()),
            self.pipeline_depth(),
            stop=lambda n: self.done(submitted=self.steps + n),
        ):
            self._collect(future)

    def pipeline_depth(self) -> int:
        """``--pipeline-depth``, or auto: 2 where micro-batches do not compete for CPU cores' OpenMP workers."""
        depth = self.daemon.config.pipeline_depth
        if depth:
            return depth
        return 2 if self.daemon.device == "cuda" or torch.get_num_threads() == 1 else 1

    def _batches(self) -> Iterator[torch.Tensor]:
        data_epoch = 0
        while not self.done():
            yield from batches(self.train, self.daemon.spec.data.micro_batch_size, self.daemon.config.seed, data_epoch)
            data_epoch += 1

    def _collect(self, future: Future[StepResult]) -> None:
        try:
            self.record(future.result())
        except SpanUnavailableError as exc:
            log.warning(f"{exc}; going on with the next micro-batch")
            return
        self.steps += 1
        self.daemon.tick()
