"""Serve one span with hivemind.moe and train its LoRA with a hivemind.Optimizer shared by the span's replicas.

All replicas of a span share one ``run_id`` (round + span). Gradients are accumulated to the round's
``target_batch_size`` across the swarm; then every live replica, including one that received no samples
(weight 0), joins the all-reduce and applies the same update, so replicas are identical after every epoch
(exact up to fp32 rounding). A replica that is behind downloads the state from a replica
(``load_state_from_peers``); after a failed all-reduce the replicas copy one replica's state (``_reconcile``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import hivemind
import torch
from hivemind.moe.server import Server
from hivemind.utils import ValueWithExpiration
from hivemind.utils.logging import get_logger

from peer.announce import online_servers
from peer.backend import SpanBackend, ValidatingConnectionHandler
from swarm.config import RoundSpec, SpanRange
from swarm.dht_records import ServerAnnouncement
from swarm.lora import attach_lora, export_lora_state, import_lora_state, lora_parameters
from swarm.quantize import Quantize
from swarm.span import load_span

log = get_logger(__name__)
#: Seconds between publications of this replica's sample count (other replicas see an epoch end this much later).
PROGRESS_REPORT_INTERVAL = 0.2


def expert_uid(round_id: str, span: SpanRange) -> str:
    """hivemind expert uid of a span (``prefix.index`` form required by hivemind.moe)."""
    return f"ls_{round_id.replace('.', '_')}_span{span.start}_{span.end}.0"


class ThrottledEvent(threading.Event):
    """``threading.Event`` whose ``set()`` takes effect at most once per ``interval`` (a late call is deferred, not lost).

    hivemind's progress tracker publishes a signed DHT record each time its event is set, i.e. after every
    micro-batch. With short micro-batches that traffic (RSA signing, the DHT process, p2pd) took a third of the
    CPU of a 2-core peer; other replicas only need the count a few times per second.
    """

    def __init__(self, interval: float):
        super().__init__()
        self.interval, self._last = interval, 0.0
        self._timer: threading.Timer | None = None
        self._guard = threading.Lock()

    def set(self) -> None:
        with self._guard:
            wait = self._last + self.interval - time.monotonic()
            if wait <= 0:
                self._last = time.monotonic()
                super().set()
            elif self._timer is None:
                timer = threading.Timer(wait, self._fire)
                timer.daemon = True
                timer.start()
                self._timer = timer

    def _fire(self) -> None:
        with self._guard:
            self._timer, self._last = None, time.monotonic()
        super().set()


class SwarmOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer for a span replica group, whose epochs :class:`SpanServer` ends (``end_epoch``).

    hivemind ends an epoch inside ``step()`` of whichever peer notices it, and only peers that call ``step()``
    join the all-reduce. A span server calls ``step()`` only when requests arrive, so a replica that got no
    samples in an epoch would not join, the others would time out and "proceed with local gradients", and the
    replicas would diverge. Here requests only *accumulate* (:meth:`accumulate`), and every live replica joins
    every epoch's gradient all-reduce, weighted by its sample count (0 is fine). The epoch ends when the group
    has accumulated ``target_batch_size`` samples (not at hivemind's estimated time).
    """

    def __init__(
        self,
        *args: Any,
        other_replicas: Callable[[], int],
        on_averaging: Callable[[bool, float], None] | None = None,
        **kwargs: Any,
    ):
        self._other_replicas, self._on_averaging = other_replicas, on_averaging
        self._fell_back = self._alone = False
        super().__init__(*args, **kwargs)
        # Publish our progress a few times per second rather than after every micro-batch (our own view of the
        # epoch is updated at once; see epoch_is_over). hivemind's reporter reads this attribute on every pass.
        self.tracker.should_report_progress = ThrottledEvent(PROGRESS_REPORT_INTERVAL)

    def accumulate(self, batch_size: int) -> None:
        """Add the LoRA gradients of a batch to this epoch's accumulators and report progress (no epoch end)."""
        self._check_and_accumulate_gradients(batch_size, None)

    def epoch_is_over(self) -> bool:
        """The group has accumulated the target batch for our epoch (as last read from the DHT)."""
        progress = self.tracker.global_progress
        return progress.epoch == self.local_epoch and progress.samples_accumulated >= self.tracker.target_batch_size

    def end_epoch(self) -> bool:
        """All-reduce this epoch's gradients with the group, apply them, move to the next epoch.

        Returns True when the update used the group's averaged gradients, False when it fell back to local ones.
        """
        self._update_global_epoch(None)  # hivemind 1.1.12 internal (pinned); calls the two overrides below
        return not self._fell_back

    def _average_gradients_and_load_into_optimizer(self, maybe_step_control: Any) -> None:
        self._fell_back, started = False, time.perf_counter()
        super()._average_gradients_and_load_into_optimizer(maybe_step_control)
        if self._alone:
            outcome = "no other replica, local gradients"
        else:
            outcome = "proceeding with local gradients" if self._fell_back else "averaged gradients"
        log.info(f"{self.run_id} epoch {self.local_epoch}: {outcome} ({time.perf_counter() - started:.1f} s)")
        if self._on_averaging is not None and not self._alone:
            self._on_averaging(not self._fell_back, time.perf_counter() - started)

    def _begin_averaging_gradients(self, grad_scaler: Any) -> bool:
        """Join the group's all-reduce unless no other replica is announced (then the update uses local gradients).

        Replaces hivemind's version, which asks its progress tracker whether other peers exist: the tracker lists
        only peers that reported samples recently, so a replica without samples would average alone.
        """
        # Nothing pre-schedules matchmaking here (see SpanServer._run_epochs): a previous control is a past epoch's.
        self.scheduled_grads = None
        self._alone = self._other_replicas() == 0
        if self._alone:
            return True  # -> _average_gradients_and_load_into_optimizer(None) loads the local gradients
        try:
            # keep the accumulators until the epoch ends, so a failed all-reduce falls back to real local gradients
            self.scheduled_grads = self.grad_averager.step(reset_accumulators=False, wait=False)
        except Exception:
            log.exception(f"{self.run_id}: could not start the gradient all-reduce")
        return True

    def _load_local_gradients_into_optimizer(self) -> None:
        self._fell_back = not self._alone  # "Proceeding with local gradients" although replicas exist
        super()._load_local_gradients_into_optimizer()

    def set_sharing_priority(self, value: float) -> None:
        """Priority with which other replicas download state from us (hivemind uses the local epoch)."""
        self.state_averager.state_sharing_priority = value
        if self.grad_averager is not None:
            self.grad_averager.state_sharing_priority = value

    def sharing_priorities(self) -> dict[bytes, float]:
        """Peer id (bytes) -> state-sharing priority of the replicas offering their state, as declared in the DHT."""
        found = self.dht.get(f"{self.state_averager.prefix}.all_averagers", latest=True)
        if found is None or not isinstance(found.value, dict):
            return {}
        return {
            bytes(peer): float(item.value)
            for peer, item in found.value.items()
            if isinstance(peer, bytes) and isinstance(item, ValueWithExpiration) and isinstance(item.value, int | float)
        }


class SpanServer:
    """A span with LoRA, served over libp2p and trained through its replica group's optimizer."""

    def __init__(
        self,
        spec: RoundSpec,
        span: SpanRange,
        dht: hivemind.DHT,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        initial_state: dict[str, torch.Tensor] | None = None,
        on_served: Callable[[str, int, float], None] | None = None,
        on_averaging: Callable[[bool, float], None] | None = None,
        on_epoch: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
        max_batch_size: int = 64,
        quantize: Quantize = "none",
    ):
        spec.span_index(span)
        self.spec, self.span, self.dht = spec, span, dht
        self.uid = expert_uid(spec.round_id, span)
        self.peer_id = str(dht.peer_id)
        self.on_epoch = on_epoch
        self._replicas_read = (0, -float("inf"))  # (count, monotonic time read)
        self.module = attach_lora(
            load_span(spec.base.path, span, dtype=dtype, device=device, quantize=quantize), spec.lora
        )
        if initial_state is not None:
            mine = lora_parameters(self.module)
            import_lora_state(self.module, {k: v for k, v in initial_state.items() if k in mine})
        opt = spec.optimizer
        factory = (
            partial(torch.optim.AdamW, lr=opt.lr, weight_decay=opt.weight_decay)
            if opt.name == "adamw"
            else partial(torch.optim.SGD, lr=opt.lr, weight_decay=opt.weight_decay)
        )
        self.optimizer = SwarmOptimizer(
            dht=dht,
            run_id=spec.run_id(span),
            target_batch_size=opt.target_batch_size,
            optimizer=factory,
            params=list(lora_parameters(self.module).values()),
            matchmaking_time=opt.matchmaking_time,
            averaging_timeout=opt.averaging_timeout,
            average_state_every=opt.average_state_every or 10**9,
            delay_state_averaging=False,
            average_opt_statistics=("exp_avg", "exp_avg_sq") if opt.name == "adamw" else (),
            averager_opts=dict(request_timeout=max(0.5, opt.matchmaking_time / 2)),
            # Read the group's progress often (an epoch can be shorter than hivemind's default refresh period), and
            # let a dead replica's progress record expire in seconds rather than a minute.
            tracker_opts=dict(
                min_refresh_period=0.5,
                default_refresh_period=0.5,
                max_refresh_period=max(1.0, opt.matchmaking_time),
                metadata_expiration=max(10.0, 3 * opt.matchmaking_time),
            ),
            verbose=False,
            on_averaging=on_averaging,
            other_replicas=lambda: self.other_replicas(max_age=0.0),  # fresh at every epoch end
        )
        self.backend = SpanBackend(
            self.uid,
            self.module,
            seq_len=spec.data.seq_len,
            dtype=dtype,
            optimizer=self.optimizer,
            on_served=on_served,
            max_batch_size=max_batch_size,
            after_accumulate=self.end_epoch_if_over,
        )
        self.server = Server(dht, {self.uid: self.backend}, num_connection_handlers=1, start=False)
        self.server.conn_handlers = [ValidatingConnectionHandler(dht, {self.uid: self.backend})]
        # hivemind's Runtime loop never wakes up after its pools are terminated; as a non-daemon thread it would
        # keep the process alive forever after shutdown().
        self.server.daemon = True
        self._stop = threading.Event()
        self._epoch_thread = threading.Thread(target=self._run_epochs, name=f"epochs-{span.name}", daemon=True)

    @property
    def epoch(self) -> int:
        return int(self.optimizer.local_epoch)

    @property
    def lock(self) -> threading.RLock:
        return self.backend.lock

    def other_replicas(self, max_age: float = 1.0) -> int:
        """Live replicas of this span other than us, from the signed DHT announcements (re-read after ``max_age`` s)."""
        now = time.monotonic()
        if now - self._replicas_read[1] > max_age:
            mine = (self.span.start, self.span.end)
            count = len(
                {a.peer_id for a in online_servers(self.dht, self.spec.round_id) if a.span == mine} - {self.peer_id}
            )
            self._replicas_read = (count, now)
        return self._replicas_read[0]

    def announcement(self, throughput: float, **fields: Any) -> ServerAnnouncement:
        """This span's DHT record; ``fields`` adds the rest (the daemon: state, versions, addresses)."""
        return ServerAnnouncement(
            peer_id=self.peer_id,
            span_start=self.span.start,
            span_end=self.span.end,
            throughput=throughput,
            expert_uid=self.uid,
            epoch=self.epoch,
            **fields,
        )

    def start(self, catch_up: bool = True) -> None:
        """Catch up with the replicas already training (if any), then serve and run epoch ends."""
        if catch_up:
            # Let the tracker read the group's progress once, so a late joiner sees that it is behind.
            self.optimizer.tracker.fetched_global_progress_this_epoch.wait(timeout=10)
            self.catch_up()
        self.server.run_in_background(await_ready=True)
        self._epoch_thread.start()
        self._settled(self.epoch)

    def catch_up(self) -> bool:
        """Download the span's LoRA + optimizer state from a replica if the group is ahead of us.

        Every replica starts from the same state (seeded LoRA init or the round's parent adapter), so a replica
        joining while the group is still at epoch 0 has nothing to download.
        """
        if self.optimizer.tracker.global_epoch <= self.epoch:
            return False
        with self.lock:
            log.info(
                f"Span {self.span.name}: loading state from peers (epoch {self.epoch} -> "
                f"{self.optimizer.tracker.global_epoch})"
            )
            self.optimizer.load_state_from_peers()
        return True

    def end_epoch_if_over(self) -> bool:
        """End the epoch if the group has its target batch: all-reduce (every replica joins), step, settle.

        Called by the thread that just accumulated gradients (a trainer or hivemind's Runtime thread), so that on
        an active peer the optimizer step runs where the compute runs, and by the epoch thread for a replica that
        received no samples. On CPU, torch work from an extra Python thread competes with the first thread's
        OpenMP workers (measured: halved a trainer's throughput at 2 intra-op threads).
        """
        with self.lock:
            if not self.optimizer.epoch_is_over():
                return False
            averaged = self.optimizer.end_epoch()
            if not averaged and self.other_replicas() > 0:
                self._reconcile()
            self._settled(self.epoch)
        return True

    def _run_epochs(self) -> None:
        """Epoch ends nobody else triggers (no samples here, or the others' samples completed the batch), catch-up."""
        opt = self.optimizer
        while not self._stop.wait(0.05):
            try:
                if opt.tracker.global_epoch > opt.local_epoch:
                    if self.catch_up():
                        self._settled(self.epoch)
                elif opt.epoch_is_over():
                    self.end_epoch_if_over()
                # No pre-scheduled matchmaking (hivemind schedules it at the estimated epoch end): the group key
                # does not include the epoch, and a group arranged early could pair one replica's epoch e+1
                # gradients with another's epoch e. Each epoch's matchmaking starts at its end instead.
            except Exception:  # keep running; the next pass retries the same transition
                if not self._stop.is_set():
                    log.exception(f"Span {self.span.name}: epoch thread error")

    def _reconcile(self, settle: float = 1.0) -> None:
        """After a failed all-reduce while other replicas live: make every replica hold one state again.

        We mark our state for this epoch as unconfirmed (sharing priority ``epoch - 0.5``; hivemind uses the epoch)
        and give the other replicas ``settle`` seconds to do the same if their all-reduce failed too. Then: if a
        replica averaged successfully, or all failed and one has a smaller peer id, we download its state;
        otherwise the others copy ours. A replica whose all-reduce fails later than that still has the previous
        epoch's priority, is not counted, and copies us when its own turn comes.
        """
        opt, epoch = self.optimizer, self.epoch
        me = self.dht.peer_id.to_bytes()
        opt.set_sharing_priority(epoch - 0.5)
        self._stop.wait(settle)
        others = {p: v for p, v in opt.sharing_priorities().items() if p != me and v >= epoch - 0.5}
        if others and (any(v >= epoch for v in others.values()) or min(others) < me):
            log.info(f"Span {self.span.name}: all-reduce before epoch {epoch} failed; copying a replica's state")
            opt.load_state_from_peers()
        else:
            log.info(f"Span {self.span.name}: all-reduce before epoch {epoch} failed; replicas copy our state")
        opt.set_sharing_priority(float(self.epoch))

    def _settled(self, epoch: int) -> None:
        if self.on_epoch is not None:
            state = self.lora_state()
            if self.epoch == epoch:
                self.on_epoch(epoch, state)

    def lora_state(self) -> dict[str, torch.Tensor]:
        with self.lock:
            return export_lora_state(self.module)

    def shutdown(self) -> None:
        """Stop epoch ends, leave the averaging group, then stop serving (hivemind's Server also stops the DHT)."""
        self._stop.set()
        if self._epoch_thread.is_alive():
            self._epoch_thread.join(timeout=5)
        self.optimizer.shutdown()
        self.server.shutdown()
