"""Serve one span with hivemind.moe and train its LoRA with a hivemind.Optimizer shared by the span's replicas.

All replicas of a span share one ``run_id`` (round + span). Gradients are accumulated to the round's
``target_batch_size`` across the swarm and all-reduced, so every replica applies the same update (exact).
A replica that received no samples in an epoch does not average; it downloads the new state from a replica
that did (``load_state_from_peers``), so replicas are again identical after every epoch.
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
from hivemind.utils.logging import get_logger

from peer.backend import SpanBackend, ValidatingConnectionHandler
from swarm.config import RoundSpec, SpanRange
from swarm.lora import attach_lora, export_lora_state, import_lora_state, lora_parameters
from swarm.span import load_span

log = get_logger(__name__)


def expert_uid(round_id: str, span: SpanRange) -> str:
    """hivemind expert uid of a span (``prefix.index`` form required by hivemind.moe)."""
    return f"ls_{round_id.replace('.', '_')}_span{span.start}_{span.end}.0"


class SwarmOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer that reports the outcome of every gradient all-reduce."""

    def __init__(self, *args: Any, on_averaging: Callable[[bool, float], None] | None = None, **kwargs: Any):
        self._on_averaging = on_averaging
        self._fell_back = False
        super().__init__(*args, **kwargs)

    def _average_gradients_and_load_into_optimizer(self, maybe_step_control: Any) -> None:
        self._fell_back, started = False, time.perf_counter()
        super()._average_gradients_and_load_into_optimizer(maybe_step_control)
        outcome = "proceeding with local gradients" if self._fell_back else "averaged gradients"
        log.info(f"{self.run_id} epoch {self.local_epoch}: {outcome} ({time.perf_counter() - started:.1f} s)")
        if self._on_averaging is not None:
            self._on_averaging(not self._fell_back, time.perf_counter() - started)

    def _load_local_gradients_into_optimizer(self) -> None:
        self._fell_back = True  # "Proceeding with local gradients"
        super()._load_local_gradients_into_optimizer()


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
        max_batch_size: int = 64,
    ):
        spec.span_index(span)
        self.spec, self.span, self.dht = spec, span, dht
        self.uid = expert_uid(spec.round_id, span)
        self.module = attach_lora(load_span(spec.base.path, span, dtype=dtype, device=device), spec.lora)
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
            # Averaging Adam's moments too makes state averaging a full reconciliation of diverged replicas.
            average_opt_statistics=("exp_avg", "exp_avg_sq") if opt.name == "adamw" else (),
            averager_opts=dict(request_timeout=max(0.5, opt.matchmaking_time / 2)),
            # Re-read the group's progress often: an epoch can take less than hivemind's default refresh period,
            # and a replica whose progress is not seen in time is left out of that epoch's all-reduce.
            tracker_opts=dict(
                min_refresh_period=0.1, default_refresh_period=0.5, max_refresh_period=max(1.0, opt.matchmaking_time)
            ),
            verbose=True,
            on_averaging=on_averaging,
        )
        self.backend = SpanBackend(
            self.uid,
            self.module,
            seq_len=spec.data.seq_len,
            dtype=dtype,
            optimizer=self.optimizer,
            on_served=on_served,
            max_batch_size=max_batch_size,
        )
        self.server = Server(dht, {self.uid: self.backend}, num_connection_handlers=1, start=False)
        self.server.conn_handlers = [ValidatingConnectionHandler(dht, {self.uid: self.backend})]
        # hivemind's Runtime loop never wakes up after its pools are terminated; as a non-daemon thread it would
        # keep the process alive forever after shutdown().
        self.server.daemon = True
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch_epochs, name=f"epochs-{span.name}", daemon=True)

    @property
    def epoch(self) -> int:
        return int(self.optimizer.local_epoch)

    @property
    def lock(self) -> threading.RLock:
        return self.backend.lock

    def start(self, catch_up: bool = True) -> None:
        """Catch up with the replicas already training (if any), then serve and watch epoch ends."""
        if catch_up:
            # Let the tracker read the swarm's progress once, so a late joiner sees that it is behind.
            self.optimizer.tracker.fetched_global_progress_this_epoch.wait(timeout=10)
            self.catch_up()
        self.server.run_in_background(await_ready=True)
        # hivemind lists a peer in its group's progress only once it has reported samples. Report one at start
        # so the replicas see each other before the first epoch ends (that epoch then ends one sample early);
        # otherwise each replica of a fresh group "proceeds with local gradients" alone and they diverge.
        opt = self.optimizer
        opt.tracker.report_local_progress(opt.local_epoch, max(1, opt.grad_averager.local_samples_accumulated))
        self._watcher.start()

    def catch_up(self) -> bool:
        """Download the span's LoRA + optimizer state from a replica if the swarm is ahead of us."""
        tracker = self.optimizer.tracker
        if tracker.global_progress.num_peers <= 1 and tracker.global_epoch <= self.epoch:
            return False
        with self.lock:
            log.info(f"Span {self.span.name}: loading state from peers (epoch {self.epoch} -> {tracker.global_epoch})")
            self.optimizer.load_state_from_peers()
        return True

    def _watch_epochs(self) -> None:
        """Join the epoch's all-reduce when we hold samples but no request arrives; catch up when behind."""
        while not self._stop.wait(0.25):
            try:
                opt = self.optimizer
                if opt.tracker.global_epoch > opt.local_epoch:
                    self.catch_up()
                elif opt.tracker.ready_to_update_epoch and opt.grad_averager.local_samples_accumulated > 0:
                    with self.lock:
                        if opt.tracker.ready_to_update_epoch and opt.grad_averager.local_samples_accumulated > 0:
                            opt._update_global_epoch(None)  # hivemind 1.1.12 internal, pinned version
            except Exception:  # keep watching; the next step() retries the same transition
                log.exception(f"Span {self.span.name}: epoch watcher error")

    def lora_state(self) -> dict[str, torch.Tensor]:
        with self.lock:
            return export_lora_state(self.module)

    def shutdown(self) -> None:
        """Stop watching, leave the averaging group, then stop serving (hivemind's Server also stops the DHT)."""
        self._stop.set()
        if self._watcher.is_alive():
            self._watcher.join(timeout=5)
        self.optimizer.shutdown()
        self.server.shutdown()
