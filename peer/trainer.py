"""The trainer: drives micro-batches through the chain of spans and backpropagates through the same peers.

Its own spans run locally (twin module, no recomputation); other spans are called on a replica chosen by
measured throughput, with failover to another replica when a call fails or times out. A span with no live
server makes the trainer wait and say so.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import hivemind
import torch
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.utils.logging import get_logger

from peer.announce import online_servers
from peer.remote import RemoteCallError, RemoteSpan
from peer.server import SpanServer, expert_uid
from swarm.config import RoundSpec, SpanRange
from swarm.routing import NoReplicaError, Replica, choose_replica
from swarm.span import TrainerHead

log = get_logger(__name__)


class SpanUnavailableError(RuntimeError):
    """No server answered for a span within the wait limit."""


@dataclass
class Router:
    """Knows the replicas of every span (from the DHT) and which peers failed recently."""

    dht: hivemind.DHT
    spec: RoundSpec
    local: dict[SpanRange, SpanServer]
    timeout: float
    refresh_period: float = 2.0
    ban_seconds: float = 15.0
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    stop: threading.Event = field(default_factory=threading.Event)  # set on shutdown: stop waiting
    _replicas: dict[tuple[int, int], list[Replica]] = field(default_factory=dict)
    _banned: dict[str, float] = field(default_factory=dict)
    _refreshed: float = 0.0
    _handles: dict[tuple[str, str], RemoteSpan] = field(default_factory=dict)
    _p2p: object = None
    _lock: threading.RLock = field(default_factory=threading.RLock)  # micro-batches in flight share the router

    def refresh(self, force: bool = False) -> None:
        with self._lock:
            if not force and time.monotonic() - self._refreshed < self.refresh_period:
                return
            replicas: dict[tuple[int, int], list[Replica]] = {}
            for ann in online_servers(self.dht, self.spec.round_id):
                replicas.setdefault(ann.span, []).append(Replica(ann.peer_id, float(ann.throughput)))
            self._replicas, self._refreshed = replicas, time.monotonic()

    def peers_seen(self) -> dict[str, int]:
        return {f"{a}-{b}": len(rs) for (a, b), rs in self._replicas.items()}

    def ban(self, peer_id: str) -> None:
        with self._lock:
            self._banned[peer_id] = time.monotonic() + self.ban_seconds

    def pick(self, span: SpanRange, wait: float, say: Callable[[str], None]) -> RemoteSpan:
        """A remote replica of ``span``, waiting up to ``wait`` seconds for one to appear."""
        deadline, announced = time.monotonic() + wait, False
        while True:
            self.refresh()
            now = time.monotonic()
            try:
                with self._lock:
                    banned = {p for p, until in self._banned.items() if until > now}
                    mine = str(self.dht.peer_id)
                    candidates = [r for r in self._replicas.get((span.start, span.end), []) if r.peer_id != mine]
                    choice = choose_replica(candidates, exclude=banned, rng=self.rng)
                    return self._handle(choice.peer_id, span)
            except NoReplicaError:
                if self.stop.is_set():
                    raise SpanUnavailableError(f"stopped while waiting for a server of span {span.name}") from None
                if now >= deadline:
                    raise SpanUnavailableError(f"no live server for span {span.name} after {wait:.0f} s") from None
                if not announced:
                    say(f"waiting for a server of span {span.name} (none alive)")
                    announced = True
                self.stop.wait(min(1.0, max(0.05, deadline - now)))
                self.refresh(force=True)

    def _handle(self, peer_id: str, span: SpanRange) -> RemoteSpan:
        uid = expert_uid(self.spec.round_id, span)
        if (peer_id, uid) not in self._handles:
            if self._p2p is None:
                self._p2p = RemoteExpertWorker.run_coroutine(self.dht.replicate_p2p())
            self._handles[peer_id, uid] = RemoteSpan(self._p2p, peer_id, uid, self.timeout)  # type: ignore[arg-type]
        return self._handles[peer_id, uid]


def _forward(handle: RemoteSpan, x: torch.Tensor) -> torch.Tensor:
    return handle.forward(x)


def _backward(handle: RemoteSpan, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return handle.backward(x, g)


@dataclass
class StepResult:
    loss: float
    samples: int
    tokens: int
    seconds: float


class ChainTrainer:
    """One forward/backward of a micro-batch through every span of the round."""

    def __init__(
        self,
        spec: RoundSpec,
        head: TrainerHead,
        router: Router,
        *,
        max_attempts: int = 4,
        span_wait: float = 120.0,
        say: Callable[[str], None] = log.info,
        on_wire: Callable[[int, int], None] | None = None,
        on_failover: Callable[[], None] | None = None,
    ):
        self.spec, self.head, self.router = spec, head, router
        self.max_attempts, self.span_wait, self.say = max_attempts, span_wait, say
        self.on_wire = on_wire or (lambda sent, received: None)
        self.on_failover = on_failover or (lambda: None)

    def _remote(self, span: SpanRange, call: Callable[[RemoteSpan], torch.Tensor]) -> torch.Tensor:
        last: Exception | None = None
        for _ in range(self.max_attempts):
            handle = self.router.pick(span, self.span_wait, self.say)
            try:
                return call(handle)
            except RemoteCallError as exc:
                last = exc
                self.on_failover()
                self.say(f"span {span.name}: {exc}; failing over to another replica")
                self.router.ban(handle.peer_id)
                self.router.refresh(force=True)
        raise SpanUnavailableError(f"span {span.name}: {self.max_attempts} attempts failed, last: {last}")

    def step(self, input_ids: torch.Tensor) -> StepResult:
        started = time.perf_counter()
        batch = int(input_ids.shape[0])
        with torch.no_grad():
            hidden = self.head.embed(input_ids)
        saved: list[tuple[SpanRange, torch.Tensor, torch.Tensor | None]] = []
        for span in self.spec.spans:
            server = self.router.local.get(span)
            if server is not None:
                inp = hidden.detach().requires_grad_(True)
                out = server.backend.local_forward(inp)
                saved.append((span, inp, out))
                hidden = out.detach()
            else:
                inp = hidden.detach()
                saved.append((span, inp, None))
                hidden = self._remote(span, partial(_forward, x=inp))
                self.on_wire(inp.nbytes, hidden.nbytes)
        last = hidden.detach().requires_grad_(True)
        loss = self.head.loss(last, input_ids)
        loss.backward()
        grad = last.grad
        assert grad is not None
        for span, inp, local_out in reversed(saved):
            if local_out is not None:
                local_out.backward(grad)
                upstream = inp.grad
                assert upstream is not None
                grad = upstream
                self.router.local[span].backend.local_apply_grads(batch)
            else:
                grad = self._remote(span, partial(_backward, x=inp, g=grad))
                self.on_wire(2 * inp.nbytes, grad.nbytes)
        return StepResult(float(loss), batch, batch * int(input_ids.shape[1]), time.perf_counter() - started)

    @torch.no_grad()
    def evaluate(self, sequences: torch.Tensor, batch_size: int) -> float:
        """Mean held-out loss of the swarm's current LoRA (forward only, through the same chain)."""
        total, count = 0.0, 0
        for i in range(0, len(sequences), batch_size):
            ids = sequences[i : i + batch_size]
            hidden = self.head.embed(ids)
            for span in self.spec.spans:
                server = self.router.local.get(span)
                if server is not None:
                    with server.lock:
                        hidden = server.module(hidden)
                else:
                    hidden = self._remote(span, partial(_forward, x=hidden))
            total += float(self.head.loss(hidden, ids)) * len(ids)
            count += len(ids)
        return total / max(count, 1)


def in_flight(
    step: Callable[[torch.Tensor], StepResult],
    batches: Iterable[torch.Tensor],
    depth: int,
    stop: Callable[[int], bool] = lambda _: False,
) -> Iterator[Future[StepResult]]:
    """Run ``step`` on ``batches`` with up to ``depth`` micro-batches in flight; yield their futures in order.

    ``stop(n_in_flight)`` is asked before each new micro-batch starts; once true, the ones in flight are drained.
    With several in flight, one micro-batch's remote calls overlap another's local compute and the other peers'
    compute. Each micro-batch runs whole in one worker thread (own twin of the local span, see SpanBackend).
    ``depth`` 1 runs in the calling thread: on CPU, torch ops issued from a second Python thread compete with the
    first thread's OpenMP workers (measured 2.3x slower per op with 2 intra-op threads on 2 cores), so CPU peers
    should pipeline only with ``--threads 1``.
    """
    if depth <= 1:
        for batch in batches:
            if stop(0):
                return
            done: Future[StepResult] = Future()
            try:
                done.set_result(step(batch))
            except Exception as exc:  # delivered through the future, like the pipelined path
                done.set_exception(exc)
            yield done
        return
    pending: deque[Future[StepResult]] = deque()
    with ThreadPoolExecutor(depth, thread_name_prefix="micro-batch") as pool:
        for batch in batches:
            while len(pending) >= depth:
                yield pending.popleft()
            if stop(len(pending)):
                break
            pending.append(pool.submit(step, batch))
        while pending:
            yield pending.popleft()
