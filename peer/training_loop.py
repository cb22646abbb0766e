"""The trainer role's loop: held-out eval, micro-batches through the chain until the round's end condition."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import torch
from hivemind.utils.logging import get_logger

from peer.announce import fetch_trainers, online_servers
from peer.config import PeerConfig
from peer.daemon import PeerDaemon
from peer.step_records import StepRecorder
from peer.trainer import ChainTrainer, MicroBatch, Router, SpanUnavailableError, StepOverError, StepResult
from swarm.checkpoint import resolve_checkpoint
from swarm.config import DataSettings
from swarm.data import batches, load_round_data
from swarm.span import load_trainer_head
from swarm.steps import current_step, participants, share, slots_per_step

log = get_logger(__name__)


def trainer_data(data: DataSettings, cfg: PeerConfig) -> DataSettings:
    """The data files this trainer reads: only those its volunteer named when the spec came from a coordinator.

    A coordinator's spec may name ``train_path`` / ``eval_path`` (its operator's files, e.g. for its own
    evaluator): a volunteer's peer never opens them, or a hostile spec could make it train on, and report the
    loss of, any file on the volunteer's machine. A spec file the volunteer passed with ``--round-spec`` is
    theirs: its paths are used unless ``--data`` / ``--eval-data`` override them.
    """
    chosen = {"train_path": cfg.data_path, "eval_path": cfg.eval_data_path}
    if cfg.coordinator:
        named = [p for p in (data.train_path, data.eval_path) if p and p not in chosen.values()]
        if named:
            log.info(f"the round spec names data files {named}: this peer reads only --data / --eval-data")
    else:  # the volunteer's own spec: its paths stand where no flag overrides them
        chosen = {field: path for field, path in chosen.items() if path}
    settings = data.model_copy(update=chosen)
    if not settings.train_path:
        raise ValueError(
            "the trainer needs data: pass --data FILE"
            + ("" if cfg.coordinator else " or set data.train_path in the round spec")
        )
    return settings


class TrainingLoop:
    """Drives this peer's data shard through the swarm, one swarm-wide step at a time (see swarm.steps)."""

    def __init__(self, daemon: PeerDaemon):
        from transformers import AutoTokenizer

        self.daemon = daemon
        cfg, spec = daemon.config, daemon.spec
        tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(spec.base.path))
        settings = trainer_data(spec.data, cfg)
        self.train, held_out = load_round_data(settings, tokenizer, cfg.shard_index, cfg.num_shards)
        if len(self.train) < spec.data.micro_batch_size:
            raise ValueError(
                f"this trainer's shard has {len(self.train)} sequences, fewer than one micro-batch "
                f"({spec.data.micro_batch_size})"
            )
        self.eval_set = held_out[: cfg.eval_batches * settings.micro_batch_size]
        head = load_trainer_head(spec.base.path, dtype=daemon.dtype, device=daemon.device)
        self.router = Router(
            daemon.dht,
            spec,
            {daemon.span: daemon.server} if daemon.span is not None and daemon.server is not None else {},
            timeout=cfg.request_timeout,
            rng=random.Random(cfg.seed),
            stop=daemon.stop_event,
            on_wire=self._on_wire,
            members=daemon.members,
        )
        self.trainer = ChainTrainer(spec, head, self.router, say=log.info, on_failover=daemon.metrics.failovers.inc,
                                    on_bad_output=daemon.stats.bad_output,
                                    spot_check_rate=cfg.spot_check_rate,
                                    on_spot_check=lambda outcome: daemon.metrics.spot_checks.labels(outcome).inc())  # fmt: skip
        self.recorder = StepRecorder(daemon.dht, spec.round_id, daemon.identity)
        self.slots = slots_per_step(spec.optimizer.target_batch_size, spec.data.micro_batch_size)
        self.started = time.monotonic()
        self.microbatches = 0
        self.step = 0

    def evaluate(self, phase: str) -> float | None:
        """Held-out loss through the chain at the current step; waits (and says so) while a span has no server."""
        while True:
            try:
                loss = self.trainer.evaluate(
                    self.step, self.eval_set.to(self.daemon.device), self.daemon.spec.data.micro_batch_size
                )
                break
            except (SpanUnavailableError, StepOverError, TimeoutError) as exc:
                # TimeoutError: this peer's own span is still behind the step (it is catching up): wait again
                if self.daemon.signals.stop.is_set():
                    return None
                if isinstance(exc, StepOverError):
                    self.step = exc.epoch
                log.warning(f"{exc}; retrying the {phase} evaluation")
        self.daemon.metrics.eval_loss.set(loss)
        self.daemon.events.write(
            "eval",
            phase=phase,
            loss=loss,
            epoch=self.step,
            tokens=int(self.eval_set.numel()),
            samples=self.microbatches * self.daemon.spec.data.micro_batch_size,
        )
        for callback in self.daemon.on_eval:
            callback(phase, loss, self.step, int(self.eval_set.numel()))
        log.info(f"Held-out loss ({phase}, epoch {self.step}): {loss:.4f}")
        return loss

    def stopped(self) -> bool:
        """A stop from outside: signal, the coordinator's finalize, or --max-steps micro-batches."""
        cfg = self.daemon.config
        return bool(
            self.daemon.signals.stop.is_set()
            or self.daemon.signals.finalize.is_set()
            or (cfg.max_steps and self.microbatches >= cfg.max_steps)
        )

    def done(self) -> bool:
        """The round's end condition, counted in swarm-wide steps (or a stop) is reached."""
        return self.done_after(self.step)

    def done_after(self, step: int) -> bool:
        """Whether the round would be over with ``step`` steps done."""
        spec = self.daemon.spec
        target, deadline = spec.target_epochs, spec.end.deadline_s
        return bool(
            self.stopped() or (target and step >= target) or (deadline and time.monotonic() - self.started >= deadline)
        )

    def record(self, result: StepResult) -> None:
        m = self.daemon.metrics
        self.microbatches += 1
        self.daemon.stats.trained(result.samples, result.tokens, result.loss)
        m.samples.inc(result.samples)
        m.tokens.inc(result.tokens)
        m.loss.set(result.loss)
        m.step_seconds.observe(result.seconds)
        m.set_peers_seen(self.router.peers_seen())

    def wait_for_peers(self) -> None:
        """Wait (saying so) for ``--min-replicas`` servers of every span and ``--min-trainers`` trainers."""
        cfg, daemon, said = self.daemon.config, self.daemon, False
        while not daemon.stop_event.is_set():
            self.router.refresh(force=True)
            seen = self.router.peers_seen()
            # with --min-replicas 1 a missing span is waited for (and said) by the first call that needs it
            short = [
                s.name for s in daemon.spec.spans if cfg.min_replicas > 1 and seen.get(s.name, 0) < cfg.min_replicas
            ]
            trainers = len(fetch_trainers(daemon.dht, daemon.spec.round_id, daemon.members))
            if not short and trainers >= cfg.min_trainers:
                return
            if not said:
                log.info(
                    f"waiting for {cfg.min_replicas} servers of every span (short: {', '.join(short) or 'none'}) "
                    f"and {cfg.min_trainers} trainers (seen {trainers})"
                )
                said = True
            daemon.stop_event.wait(0.5)

    def run(self) -> None:
        records = fetch_trainers(self.daemon.dht, self.daemon.spec.round_id, self.daemon.members)
        self.step = current_step(records, floor=self._epoch_floor())
        self.recorder.open(self.step)  # visible before the wait, so the others count this trainer in
        try:
            self.wait_for_peers()
            self.evaluate("before")
            self.train_until_done()
            self.recorder.finish()
            if self.daemon.config.coordinator:
                # the coordinator counts the final eval once it has ended the round (heartbeat action "finalize")
                while not (self.daemon.signals.finalize.wait(0.5) or self.daemon.signals.stop.is_set()):
                    pass
            if not self.daemon.signals.stop.is_set():
                self.evaluate("after")
        finally:
            self.recorder.finish()

    def _epoch_floor(self) -> int:
        """The step the swarm's spans are at: this peer's own span's epoch, or for a trainer-only peer the lower
        median of the epochs the round's servers announce (one server announcing a wrong epoch does not move it)."""
        daemon = self.daemon
        if daemon.server is not None:
            return int(daemon.server.epoch)
        epochs = sorted(a.epoch for a in online_servers(daemon.dht, daemon.spec.round_id, daemon.members))
        return epochs[(len(epochs) - 1) // 2] if epochs else 0

    def train_until_done(self) -> None:
        """Swarm-wide steps until the round's end: this trainer's share of each step, then the next step."""
        spec, me = self.daemon.spec, str(self.daemon.dht.peer_id)
        stream = self._batches()
        while not self.done():
            self.recorder.open(self.step)
            others = participants(fetch_trainers(self.daemon.dht, spec.round_id, self.daemon.members), self.step)
            quota = share(self.slots, others, me)
            started, losses = time.monotonic(), list[float]()
            sent_before = self.daemon.stats.bytes_sent

            def on_result(mb: MicroBatch, result: StepResult, losses: list[float] = losses) -> None:
                losses.append(result.loss)
                self.record(result)

            try:
                done = self.trainer.run_step(
                    self.step,
                    quota,
                    stream,
                    self.pipeline_depth(),
                    stop=self.stopped,
                    on_result=on_result,
                )
                next_step = self.step + 1
            except StepOverError as exc:
                log.info(f"step {self.step} is over at the spans ({exc}); moving on")
                done, next_step = exc.completed, max(exc.epoch, self.step + 1)
            samples = sum(int(mb.input_ids.shape[0]) for mb in done)
            more = not self.done_after(next_step)
            self.recorder.close(self.step, [mb.index for mb in done], samples, next_step if more else None)
            self.router.notify_closed()
            self.daemon.events.write(
                "step",
                step=self.step,
                microbatches=[{"index": mb.index, "batch_no": mb.batch_no} for mb in done],
                samples=samples,
                quota=quota,
            )
            seconds = time.monotonic() - started
            mean = sum(losses) / len(losses) if losses else float("nan")
            replicas = ", ".join(f"{span} x{n}" for span, n in sorted(self.router.peers_seen().items()))
            sent = self.daemon.stats.bytes_sent
            log.info(
                f"step {self.step}/{self.daemon.spec.target_epochs or '?'}: {len(done)}/{quota} micro-batches "
                f"({samples} samples) in {seconds:.1f} s, {samples / max(seconds, 1e-9):.1f} samples/s, "
                f"loss {mean:.4f}, replicas [{replicas or 'none'}], sent {(sent - sent_before) / 1e6:.2f} MB"
            )
            self.step = next_step
            self.daemon.tick()

    def _on_wire(self, sent: int, received: int) -> None:
        self.daemon.metrics.wire(sent, received)
        self.daemon.stats.wire(sent, received)

    def pipeline_depth(self) -> int:
        """``--pipeline-depth``, or auto: 2 where micro-batches do not compete for CPU cores' OpenMP workers."""
        depth = self.daemon.config.pipeline_depth
        if depth:
            return depth
        return 2 if self.daemon.device == "cuda" or torch.get_num_threads() == 1 else 1

    def _batches(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(position in this trainer's data stream, micro-batch): deterministic given the shard and the seed."""
        device, mbs, seed = self.daemon.device, self.daemon.spec.data.micro_batch_size, self.daemon.config.seed
        for number, batch in enumerate(data_stream(self.train, mbs, seed)):
            yield number, batch.to(device)


def data_stream(train: torch.Tensor, micro_batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """A trainer's micro-batches, data epoch after data epoch (full micro-batches only)."""
    data_epoch = 0
    while True:
        yield from batches(train, micro_batch_size, seed, data_epoch, drop_last=True)
        data_epoch += 1
