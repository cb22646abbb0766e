"""The trainer: drives micro-batches of one swarm-wide step through the chain of spans, step after step.

Each micro-batch of step ``s`` (key: this trainer's peer id and an index) goes forward through every span and
back through the same replicas (a replica keeps the forward's activations for the backward; after a failover
the backward is sent with the inputs and recomputed). Spans this peer hosts run in-process. Other spans are
called on a replica chosen by measured throughput, with failover. A step ends for this trainer when its share of
the step's slots completed; the next step's forwards wait at every span for epoch ``s+1`` (the flush).
"""

from __future__ import annotations

import math
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
from peer.remote import RemoteBadOutputError, RemoteCallError, RemoteSpan, RemoteStaleStepError
from peer.roster_view import OPEN, Membership
from peer.server import SpanServer, StaleStepError, expert_uid
from swarm.config import RoundSpec, SpanRange
from swarm.routing import NoReplicaError, Replica, RoundRobin
from swarm.span import TrainerHead
from swarm.steps import MicroBatchKey

log = get_logger(__name__)


class SpanUnavailableError(RuntimeError):
    """No server answered for a span within the wait limit."""


class StepOverError(RuntimeError):
    """The swarm is past the step this trainer works on (``epoch``: where the span that said so is)."""

    def __init__(self, epoch: int):
        super().__init__(f"the swarm is at epoch {epoch}")
        self.epoch = epoch
        self.completed: list[MicroBatch] = []  # what this trainer completed of its step before it noticed


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
    on_wire: Callable[[int, int], None] = lambda sent, received: None
    members: Membership = OPEN  # where a roster decides, only its members for a span are routed to
    _replicas: dict[tuple[int, int], list[Replica]] = field(default_factory=dict)
    _quantize: dict[str, str] = field(default_factory=dict)  # peer id -> how it stores the base (announced)
    _rotation: dict[tuple[int, int], RoundRobin] = field(default_factory=dict)  # per span: who is next
    _banned: dict[str, float] = field(default_factory=dict)
    _refreshed: float = 0.0
    _handles: dict[tuple[str, str], RemoteSpan] = field(default_factory=dict)
    _p2p: object = None
    _lock: threading.RLock = field(default_factory=threading.RLock)  # micro-batches in flight share the router

    def refresh(self, force: bool = False) -> None:
        """Re-read the announced replicas (at most every ``refresh_period`` s); the DHT read holds no lock."""
        if not force and time.monotonic() - self._refreshed < self.refresh_period:
            return
        replicas: dict[tuple[int, int], list[Replica]] = {}
        quantize: dict[str, str] = {}
        for ann in online_servers(self.dht, self.spec.round_id, self.members):
            throughput = float(ann.throughput)
            if not math.isfinite(throughput):
                continue
            replicas.setdefault(ann.span, []).append(Replica(ann.peer_id, throughput))
            quantize[ann.peer_id] = ann.quantize
        with self._lock:
            self._replicas, self._quantize, self._refreshed = replicas, quantize, time.monotonic()

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
                    rotation = self._rotation.setdefault((span.start, span.end), RoundRobin())
                    choice = rotation.pick(candidates, exclude=banned)
                    return self._handle(choice.peer_id, span)
            except (NoReplicaError, ValueError):
                if self.stop.is_set():
                    raise SpanUnavailableError(f"stopped while waiting for a server of span {span.name}") from None
                if now >= deadline:
                    raise SpanUnavailableError(f"no live server for span {span.name} after {wait:.0f} s") from None
                if not announced:
                    say(f"waiting for a server of span {span.name} (none alive)")
                    announced = True
                self.stop.wait(min(1.0, max(0.05, deadline - now)))
                self.refresh(force=True)

    def notify_closed(self) -> None:
        """This trainer closed a step: wake its own spans' replica groups, and tell every announced replica of the
        other spans (they end the epoch once every trainer closed it, without waiting for their next poll)."""
        for server in self.local.values():
            server.group.wake()
        mine = str(self.dht.peer_id)
        with self._lock:
            targets = [(r.peer_id, span) for span in self.spec.spans if span not in self.local
                       for r in self._replicas.get((span.start, span.end), []) if r.peer_id != mine]  # fmt: skip
            handles = [self._handle(peer_id, span) for peer_id, span in targets]
        for handle in handles:
            handle.notify_closed()

    def checkers(self, span: SpanRange, primary: str, n: int, timeout: float) -> list[RemoteSpan]:
        """Up to ``n`` other replicas of ``span`` that store the base like ``primary`` (not banned, random),
        with their own ``timeout``: a spot check must not hold a micro-batch for long."""
        now = time.monotonic()
        with self._lock:
            kind = self._quantize.get(primary)
            mine, banned = str(self.dht.peer_id), {p for p, until in self._banned.items() if until > now}
            others = [r.peer_id for r in self._replicas.get((span.start, span.end), [])
                      if r.peer_id not in (primary, mine) and r.peer_id not in banned
                      and self._quantize.get(r.peer_id) == kind]  # fmt: skip
            picked = self.rng.sample(others, min(n, len(others)))
            return [self._new_handle(p, span, min(timeout, self.timeout)) for p in picked]

    def _handle(self, peer_id: str, span: SpanRange) -> RemoteSpan:
        """The cached handle of ``peer_id``'s replica of ``span`` (call timeout ``self.timeout``)."""
        key = (peer_id, expert_uid(self.spec.round_id, span))
        if key not in self._handles:
            self._handles[key] = self._new_handle(peer_id, span, self.timeout)
        return self._handles[key]

    def _new_handle(self, peer_id: str, span: SpanRange, timeout: float) -> RemoteSpan:
        if self._p2p is None:
            self._p2p = RemoteExpertWorker.run_coroutine(self.dht.replicate_p2p())
        uid = expert_uid(self.spec.round_id, span)
        handle = RemoteSpan(self._p2p, peer_id, uid, timeout, self.spec.wire.compression)  # type: ignore[arg-type]
        handle.on_wire = self.on_wire
        return handle


SPOT_CHECK_TIMEOUT_S = 5.0
#: relative L2 distance two replicas' activations may have (same weights to fp32 rounding; the wire's rounding)
SPOT_CHECK_TOLERANCE = {"none": 1e-3, "float16": 1e-2, "bfloat16": 3e-2, "uint8": 0.1}


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return bool(torch.linalg.vector_norm(a.float() - b.float()) <= tol * torch.linalg.vector_norm(b.float()) + 1e-6)


def _backward(h: RemoteSpan, step: int, key: MicroBatchKey, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return h.backward(step, key, g, x)


def _evaluate(h: RemoteSpan, step: int, x: torch.Tensor) -> torch.Tensor:
    return h.evaluate(step, x)


@dataclass
class StepResult:
    loss: float
    samples: int
    tokens: int
    seconds: float


@dataclass
class MicroBatch:
    """One micro-batch of a step: its index in the step and its position in the trainer's data stream."""

    index: int
    batch_no: int
    input_ids: torch.Tensor


class ChainTrainer:
    """Forward/backward of micro-batches through every span of the round, tagged with the step."""

    def __init__(
        self,
        spec: RoundSpec,
        head: TrainerHead,
        router: Router,
        *,
        max_attempts: int = 4,
        span_wait: float = 120.0,
        say: Callable[[str], None] = log.info,
        on_failover: Callable[[], None] | None = None,
        on_bad_output: Callable[[str, str], None] = lambda peer_id, reason: None,
        spot_check_rate: float = 0.0,
        rng: random.Random | None = None,
        on_spot_check: Callable[[str], None] = lambda outcome: None,
    ):
        self.spec, self.head, self.router = spec, head, router
        self.me = str(router.dht.peer_id)
        self.max_attempts, self.span_wait, self.say = max_attempts, span_wait, say
        self.on_failover = on_failover or (lambda: None)
        self.on_bad_output = on_bad_output  # a server answered with bad data: reported to the coordinator
        self.spot_check_rate, self.rng = spot_check_rate, rng or random.Random()
        self.disagreements = 0  # spot checks where replicas disagreed and nobody could be outvoted
        self.on_spot_check = on_spot_check  # "agree" | "outvoted" | "undecided" (metrics)

    def _checked_forward(
        self, span: SpanRange, step: int, key: MicroBatchKey, x: torch.Tensor, handle: RemoteSpan
    ) -> torch.Tensor:
        """A remote forward; a ``spot_check_rate`` share is also sent to up to two other replicas of the span, as
        the same forward (a server cannot tell a check from a request), and compared (same weights: replicas agree
        to fp32 rounding after every step). Outvoted by two agreeing replicas, the answer is bad output (the caller
        reports the server and fails over); a checker outvoted by the primary and another checker is reported; one
        checker against the primary decides nothing (counted)."""
        out = handle.forward(step, key, x)
        if self.spot_check_rate <= 0 or self.rng.random() >= self.spot_check_rate:
            return out
        refs: list[tuple[str, torch.Tensor]] = []
        for check in self.router.checkers(span, handle.peer_id, 2, SPOT_CHECK_TIMEOUT_S):
            try:
                refs.append((check.peer_id, check.forward(step, key, x)))  # a forward like any: indistinguishable
            except RemoteCallError:
                continue  # busy, behind or gone: no vote
        if not refs:
            return out
        tol = SPOT_CHECK_TOLERANCE[self.spec.wire.compression]
        agrees = {p: _close(out, r, tol) for p, r in refs}
        same = [p for p, ok in agrees.items() if ok]
        differ = [p for p, ok in agrees.items() if not ok]
        if not differ:
            self.on_spot_check("agree")
            return out
        if len(differ) == 2 and _close(refs[0][1], refs[1][1], tol):
            self.on_spot_check("outvoted")
            raise RemoteBadOutputError(
                f"rpc_forward of span {span.name} on {handle.peer_id}: spot check: its activations differ from "
                f"those of {differ[0]} and {differ[1]}, which agree"
            )
        if same:
            self.on_spot_check("outvoted")
            for p in differ:
                self.on_bad_output(p, f"spot check of span {span.name}: activations differ from {handle.peer_id} "
                                      f"and {same[0]}, which agree")  # fmt: skip
                self.router.ban(p)
            return out
        self.disagreements += 1
        self.on_spot_check("undecided")
        self.say(f"span {span.name}: spot check: {handle.peer_id} and {differ[0]} disagree (no third replica)")
        return out

    def _remote(
        self, span: SpanRange, call: Callable[[RemoteSpan], torch.Tensor], first: RemoteSpan | None = None
    ) -> tuple[torch.Tensor, RemoteSpan]:
        last: Exception | None = None
        handle = first
        for _ in range(self.max_attempts):
            if handle is None:
                handle = self.router.pick(span, self.span_wait, self.say)
            try:
                return call(handle), handle
            except RemoteStaleStepError as exc:
                raise StepOverError(exc.epoch) from exc
            except RemoteCallError as exc:
                last = exc
                if isinstance(exc, RemoteBadOutputError):
                    self.on_bad_output(handle.peer_id, str(exc))
                self.on_failover()
                self.say(f"span {span.name}: {exc}; failing over to another replica")
                self.router.ban(handle.peer_id)
                self.router.refresh(force=True)
                handle = None
        raise SpanUnavailableError(f"span {span.name}: {self.max_attempts} attempts failed, last: {last}")

    def microbatch(self, step: int, mb: MicroBatch) -> StepResult:
        """One micro-batch of ``step`` through the chain and back; its LoRA gradients stay at the spans."""
        started = time.perf_counter()
        key, ids = (self.me, mb.index), mb.input_ids
        with torch.no_grad():
            hidden = self.head.embed(ids)
        saved: list[tuple[SpanRange, torch.Tensor, RemoteSpan | None]] = []
        try:
            for span in self.spec.spans:
                local = self.router.local.get(span)
                inp = hidden.detach()
                if local is not None:
                    hidden, handle = local.forward(step, key, inp), None
                else:
                    hidden, handle = self._remote(span, partial(self._checked_forward, span, step, key, inp))
                saved.append((span, inp, handle))
            last = hidden.detach().requires_grad_(True)
            loss = self.head.loss(last, ids)
            loss.backward()
            grad = last.grad
            assert grad is not None
            for span, inp, handle in reversed(saved):
                local = self.router.local.get(span)
                if local is not None:
                    grad = local.backward(step, key, grad, inp)
                else:
                    grad, _ = self._remote(span, partial(_backward, step=step, key=key, g=grad, x=inp), first=handle)
        except StaleStepError as exc:
            raise StepOverError(exc.epoch) from exc
        batch = int(ids.shape[0])
        return StepResult(float(loss), batch, batch * int(ids.shape[1]), time.perf_counter() - started)

    def run_step(
        self,
        step: int,
        quota: int,
        batches: Iterator[tuple[int, torch.Tensor]],
        depth: int,
        stop: Callable[[], bool] = lambda: False,
        on_result: Callable[[MicroBatch, StepResult], None] = lambda mb, r: None,
    ) -> list[MicroBatch]:
        """Run ``quota`` micro-batches of ``step`` (``depth`` in flight), retrying failed ones with the same data.

        Returns the micro-batches that completed. Raises :class:`StepOverError` (with ``completed`` attached) when
        a span is already past ``step``.
        """
        completed: list[MicroBatch] = []
        retry: deque[tuple[int, torch.Tensor]] = deque()
        counter = iter(range(1 << 30))
        failures = 0

        def source() -> Iterator[MicroBatch]:
            while True:
                batch_no, ids = retry.popleft() if retry else next(batches)
                yield MicroBatch(next(counter), batch_no, ids)

        overs: list[StepOverError] = []
        stream = source()

        def enough(n_in_flight: int) -> bool:
            return bool(overs) or stop() or len(completed) + n_in_flight >= quota

        while not enough(0):
            for mb, future in in_flight(lambda mb: self.microbatch(step, mb), stream, depth, stop=enough):
                try:
                    result = future.result()
                except StepOverError as exc:
                    overs.append(exc)
                    continue
                except (SpanUnavailableError, RemoteCallError, TimeoutError) as exc:
                    # TimeoutError: this peer's own span is still behind the step (catching up)
                    failures += 1
                    if failures > 3 * self.max_attempts:
                        raise
                    log.warning(f"micro-batch {mb.index} of step {step} failed ({exc}); retrying its data")
                    retry.append((mb.batch_no, mb.input_ids))
                    continue
                completed.append(mb)
                on_result(mb, result)
        if overs:
            overs[0].completed = completed
            raise overs[0]
        return completed

    @torch.no_grad()
    def evaluate(self, step: int, sequences: torch.Tensor, batch_size: int) -> float:
        """Mean held-out loss with the spans' parameters of epoch ``step`` (forward only, through the chain)."""
        total, count = 0.0, 0
        for i in range(0, len(sequences), batch_size):
            ids = sequences[i : i + batch_size]
            hidden = self.head.embed(ids)
            for span in self.spec.spans:
                local = self.router.local.get(span)
                if local is not None:
                    hidden = local.evaluate(step, hidden)
                else:
                    hidden, _ = self._remote(span, partial(_evaluate, step=step, x=hidden))
            total += float(self.head.loss(hidden, ids)) * len(ids)
            count += len(ids)
        return total / max(count, 1)


def in_flight(
    step: Callable[[MicroBatch], StepResult],
    batches: Iterable[MicroBatch],
    depth: int,
    stop: Callable[[int], bool] = lambda _: False,
) -> Iterator[tuple[MicroBatch, Future[StepResult]]]:
    """Run ``step`` on ``batches`` with up to ``depth`` micro-batches in flight; yield them with their futures in order.

    ``stop(n_in_flight)`` is asked before each new micro-batch starts; once true, the ones in flight are drained.
    With several in flight, one micro-batch's remote calls overlap another's local compute and the other peers'
    compute. ``depth`` 1 runs in the calling thread: on CPU, torch ops issued from a second Python thread compete
    with the first thread's OpenMP workers, so CPU peers should pipeline only with ``--threads 1``.
    """
    if depth <= 1:
        for batch in _until(batches, lambda: stop(0)):
            done: Future[StepResult] = Future()
            try:
                done.set_result(step(batch))
            except Exception as exc:  # delivered through the future, like the pipelined path
                done.set_exception(exc)
            yield batch, done
        return
    pending: deque[tuple[MicroBatch, Future[StepResult]]] = deque()
    with ThreadPoolExecutor(depth, thread_name_prefix="micro-batch") as pool:
        iterator = iter(batches)
        while True:
            while len(pending) >= depth:
                yield pending.popleft()
            if stop(len(pending)):
                break
            found = next(iterator, None)
            if found is None:
                break
            pending.append((found, pool.submit(step, found)))
        while pending:
            yield pending.popleft()


def _until(items: Iterable[MicroBatch], stop: Callable[[], bool]) -> Iterator[MicroBatch]:
    iterator = iter(items)
    while not stop():
        item = next(iterator, None)
        if item is None:
            return
        yield item
