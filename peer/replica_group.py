"""A span's replica group: owns the epoch protocol of one span (all-reduce, step, catch-up, repair).

Composed from hivemind's public building blocks, the way ``hivemind.Optimizer`` composes its parts, without
overriding any private method: a ``DecentralizedAverager`` over the span's LoRA gradient buffers (``step`` with
``weight`` and ``gather``) and a plain torch optimizer. What ``hivemind.Optimizer`` gets from ``ProgressTracker``
(when does an epoch end?) comes here from the trainers' step records (:mod:`swarm.steps`): an epoch ends when
every live trainer has closed it, and it applies exactly the micro-batches they declared. A replica that is behind
downloads the state of a replica it chooses (a roster member of its span, not a suspect) through the span
transport (``download``), not through hivemind's ``load_state_from_peers``, whose source is whoever declares the
highest priority.

One thread owns epoch ends (:meth:`ReplicaGroup.run`). ``lock`` covers applying gradients and parameters, never
network I/O. The averaging group key carries the epoch (``set_group_bits``), so replicas of different epochs
never average together; gathered metadata (epoch, digest of the step's contents, sample count, gradient norm and
sketch: :mod:`swarm.sanity`) is checked before the average is used, and a result inconsistent with it is recomputed
from the gradients the members show directly (:meth:`ReplicaGroup.recompute`; an eighth of the consistent ones are
audited the same way: :meth:`ReplicaGroup.audit`). Catching up and repair after a failed all-reduce are decisions
over the epochs replicas announce: a replica that is behind, or whose all-reduce failed, copies a replica that has
the next epoch. A replica whose all-reduce failed says so in its announcement and waits until every replica at its
epoch has either reached the next epoch (an all-reduce can fail on one side only) or said the same; if all failed,
every one of them skips the epoch's update alike (its gradients are dropped), so they stay identical without
trusting any one replica's local gradients. A replica that stops answering (killed: its announcement outlives it)
is found by asking it directly (``alive``) while an all-reduce waits for it, and is left out until it announces a
new epoch, so the survivors do not wait hivemind's averaging timeout for it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import multiprocessing as mp
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import hivemind
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.utils.logging import get_logger

from swarm.sanity import (
    SKETCH_SIZE,
    SKETCH_TOLERANCE,
    against_the_group,
    exceeds_bound,
    global_norm,
    outliers,
    sketch,
    sketch_mismatch,
    sketch_seed,
)
from swarm.steps import Behind, StepContents

log = get_logger(__name__)
EPOCH_BITS = 32
#: how often the step records are read while no trainer's notice arrives (the fallback for a lost notice, and how
#: a step ends whose last trainer died): soon after this replica served a backward, and otherwise; and the least
#: time between two reads (a flood of notices costs no more DHT lookups than this). Every read is a DHT lookup on
#: the nodes that hold the trainers' records, so the polls of every replica of a large swarm add up.
FAST_POLL_S, SLOW_POLL_S, READ_GAP_S = 0.25, 0.5, 0.005


class _PartialResults(logging.Handler):
    """Counts hivemind's "Averaging: received N% results" in this span's averager process.

    hivemind can end an all-reduce with only part of the results (a reducer's stream ended early) and still report
    success, leaving the missing parts un-averaged. It only logs a warning, in the averager's own (forked) process:
    this handler, installed before the fork, turns that warning into a flag the replica group reads.
    """

    def __init__(self, run_id: str):
        super().__init__(logging.WARNING)
        self.run_id, self.count = run_id, mp.Value("i", 0)

    def emit(self, record: logging.LogRecord) -> None:
        if "results" in record.getMessage() and getattr(mp.current_process(), "prefix", None) == self.run_id:
            with self.count.get_lock():
                self.count.value += 1


State = tuple[dict[str, Any], list[torch.Tensor]]
#: what a replica brought to an epoch's all-reduce: (samples, mean gradient)
Contribution = tuple[int, list[torch.Tensor]]
#: epochs whose contribution a replica keeps to show the group (see ReplicaGroup.recompute)
KEPT_CONTRIBUTIONS = 2
#: share of epochs whose all-reduce result is audited against the gradients the members show (ReplicaGroup.audit)
AUDIT_RATE = 0.125
#: the largest group whose members average again in every pair to find who made a result wrong (quadratic), and
#: the length of a pair's group bits (an epoch's are EPOCH_BITS long: the keys never meet)
MAX_PAIR_AUDIT, PAIR_BITS = 6, 48


class NotShownError(RuntimeError):
    """A member answered, but not with a contribution (malformed): it is named, as one that contradicts its
    declaration is."""


def _unavailable(peer_id: str, epoch: int) -> Contribution:
    raise ConnectionError("no transport to ask other replicas")


@dataclass
class GroupSettings:
    run_id: str
    matchmaking_time: float
    averaging_timeout: float
    audit_rate: float = AUDIT_RATE  # of epochs whose consistent result is checked against what members show


def _status(read: Future[dict[str, tuple[int, int]]] | None) -> dict[str, tuple[int, int]] | None:
    """The announcements read beside the step records, or None (not read, or the read failed: read again)."""
    if read is None:
        return None
    try:
        return read.result()
    except Exception as exc:
        log.debug(f"reading the replicas' announcements: {exc!r}")
        return None


class ReplicaGroup:
    """The epoch protocol of one span replica; see the module docstring."""

    def __init__(
        self,
        dht: hivemind.DHT,
        settings: GroupSettings,
        params: list[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        *,
        take_gradients: Callable[[StepContents], tuple[list[torch.Tensor], int]],
        step_contents: Callable[[int], StepContents | None],
        replicas: Callable[[], dict[str, tuple[int, int]]],
        announce: Callable[[], None] = lambda: None,
        on_epoch: Callable[[int], None] = lambda epoch: None,
        on_averaging: Callable[[bool, float], None] = lambda ok, seconds: None,
        download: Callable[[str], State],
        admits: Callable[[str], bool] = lambda peer_id: True,
        alive: Callable[[str], bool] = lambda peer_id: True,
        contribution: Callable[[str, int], Contribution] = _unavailable,
        epoch: int = 0,
    ):
        self.dht, self.settings, self.params, self.optimizer = dht, settings, params, optimizer
        self.peer_id = str(dht.peer_id)
        self.take_gradients, self.step_contents = take_gradients, step_contents
        self.replicas = replicas  # peer id -> (announced epoch, last failed epoch or -1): one DHT read
        self.failed_epoch = -1  # ours (announced: see repair)
        self.announce, self.on_epoch, self.on_averaging = announce, on_epoch, on_averaging
        self.admits = admits  # the roster lists this peer id for our span (peer.roster_view)
        self.download = download  # peer id -> that replica's state (SpanServer.download_state: our transport)
        self.alive = alive  # peer id -> it answers now (SpanServer.alive: a quick call over our transport)
        self.contribution = contribution  # (peer id, epoch) -> what it brought to that all-reduce (see recompute)
        self._kept: dict[int, Contribution] = {}  # ours, by epoch (shown to the group: see shown)
        self.recomputed_epochs = 0
        self.audited_epochs = 0
        self.gone: dict[str, int] = {}  # replicas found dead -> the epoch they still announced then (see _others)
        self.strangers: set[str] = set()  # peers refused in a group (named in the log and by metrics)
        self.suspects: dict[str, str] = {}  # peer id -> why an all-reduce with it was refused (swarm.sanity)
        self.inconsistent_epochs = 0
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # notified when the epoch moves
        self.epoch = epoch
        self.version = 0  # odd while parameters are being changed (see SpanServer.compute)
        self.incomplete_epochs = 0
        self.skipped_epochs = 0  # epochs whose all-reduce failed on every replica (see repair)
        self._stop = threading.Event()
        self._poked = 0.0  # monotonic time of the last poke (see poke)
        self._wake = threading.Event()
        self._notified = False  # a trainer's notice since the last read (see run)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix=f"replicas-{settings.run_id}")
        buffers = [torch.zeros_like(p, device="cpu", dtype=torch.float32) for p in params]
        self._partial = _PartialResults(settings.run_id)
        logging.getLogger("hivemind.averaging.partition").addHandler(self._partial)  # before the averager forks
        self.averager = DecentralizedAverager(
            buffers,
            dht,
            prefix=settings.run_id,
            start=True,
            min_matchmaking_time=settings.matchmaking_time,
            request_timeout=max(0.2, settings.matchmaking_time / 2),
            allreduce_timeout=settings.averaging_timeout,
            next_chunk_timeout=settings.averaging_timeout,
            initial_group_bits=self._bits(epoch),
            allow_state_sharing=False,  # a replica downloads state with ``download``, from a peer it chose
        )
        self._thread = threading.Thread(target=self.run, name=f"epochs-{settings.run_id}", daemon=True)

    @staticmethod
    def _bits(epoch: int) -> str:
        return format(epoch, f"0{EPOCH_BITS}b")

    # --- state ---------------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """Epoch, LoRA parameters and optimizer state (what a replica that catches up downloads)."""
        with self.lock:
            opt = self.optimizer.state_dict()
            keys = {str(i): sorted(k for k, v in s.items() if torch.is_tensor(v)) for i, s in opt["state"].items()}
            tensors = [p.detach().cpu().clone() for p in self.params]
            for i, names in sorted(keys.items(), key=lambda kv: int(kv[0])):
                tensors += [opt["state"][int(i)][n].detach().cpu().clone() for n in names]
            return {"epoch": self.epoch, "opt_keys": keys}, tensors

    def load_state(self, metadata: dict[str, Any], tensors: list[torch.Tensor]) -> None:
        """Take a downloaded state; ``ValueError`` (nothing changed) if it does not fit this span."""
        params, rest = tensors[: len(self.params)], tensors[len(self.params) :]
        if len(params) != len(self.params) or any(a.shape != b.shape for a, b in zip(params, self.params, strict=True)):
            raise ValueError("downloaded state does not match this span's LoRA parameters")
        opt = self.optimizer.state_dict()
        state: dict[int, dict[str, torch.Tensor]] = {}
        try:
            for i, names in sorted(metadata["opt_keys"].items(), key=lambda kv: int(kv[0])):
                if not 0 <= int(i) < len(self.params):
                    raise ValueError(f"optimizer state for parameter {i} of {len(self.params)}")
                state[int(i)] = {}
                for n in names:
                    t = rest.pop(0)
                    if (t.dim() and t.shape != self.params[int(i)].shape) or not t.is_floating_point():
                        raise ValueError(f"optimizer state {n} of parameter {i}: {list(t.shape)} {t.dtype}")
                    state[int(i)][str(n)] = t
            epoch = int(metadata["epoch"])
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed state metadata: {exc!r}") from None
        if rest:
            raise ValueError(f"{len(rest)} tensors more than the state names")
        opt["state"] = state
        with self.lock:
            self.version += 1
            with torch.no_grad():
                for p, t in zip(self.params, params, strict=True):
                    p.copy_(t.to(p.device, p.dtype))
            self.optimizer.load_state_dict(opt)
            self._advance(epoch)

    def _advance(self, epoch: int) -> None:
        """Under ``lock``: parameters now hold ``epoch``."""
        self.version += 1
        self.epoch = epoch
        self.changed.notify_all()

    # --- the epoch thread ----------------------------------------------------------------------------------
    def start(self, catch_up: bool = True) -> None:
        if catch_up:
            self.catch_up()
        self._thread.start()

    def catch_up(self) -> bool:
        """Download the state of a replica that is ahead of us, if any (before serving, and when behind).

        The source is chosen here, not by hivemind: replicas the roster admits for this span (``replicas``
        is filtered by it) that were not caught sending bad gradients, furthest ahead first. A state that is not
        ahead, does not fit this span or is not finite is refused and the next replica is tried.
        """
        ahead = {p: e for p, e in self._others().items() if e > self.epoch and p not in self.suspects}
        if not ahead:
            return False
        log.info(f"{self.settings.run_id}: epoch {self.epoch}, replicas at {max(ahead.values())}: downloading state")
        for peer in sorted(ahead, key=lambda p: (-ahead[p], p)):
            try:
                metadata, tensors = self.download(peer)
                if int(metadata.get("epoch", -1)) <= self.epoch:
                    continue
                if not all(torch.isfinite(t).all() for t in tensors):
                    self.suspects[peer] = "sent a state that is not finite"
                    raise ValueError("the state is not finite")
                self.load_state(metadata, list(tensors))
            except Exception as exc:
                log.warning(f"{self.settings.run_id}: could not take the state of {peer}: {exc}")
                continue
            log.info(f"{self.settings.run_id}: loaded state at epoch {self.epoch} from {peer}")
            self.announce()
            return True
        log.warning(f"{self.settings.run_id}: no replica sent a usable state; will retry")
        return False

    def run(self) -> None:
        while not self._stop.is_set():
            read = time.monotonic()
            # After a trainer's notice the step has most likely closed: read the replicas' announcements beside the
            # step records (two DHT lookups at once, not one after the other at the epoch end).
            notified, self._notified = self._notified, False
            status = self._reader.submit(self.replicas) if notified else None
            try:
                contents = self.step_contents(self.epoch)
            except Behind as exc:
                log.info(f"{self.settings.run_id}: {exc}")
                if not self.catch_up():
                    self._stop.wait(0.5)
                continue
            except Exception:
                log.exception(f"{self.settings.run_id}: could not read the trainers' step records")
                self._stop.wait(0.5)
                continue
            if contents is None:
                # Trainers say when they closed a step (wake); polling is the fallback for a lost notice: every
                # read is a DHT lookup. At most one read per READ_GAP_S, however often we are woken.
                fast = time.monotonic() - self._poked < 0.5
                self._wake.wait(FAST_POLL_S if fast else SLOW_POLL_S)
                self._wake.clear()
                self._stop.wait(max(0.0, read + READ_GAP_S - time.monotonic()))
                continue
            try:
                self.end_epoch(contents, _status(status))
            except Exception:
                if not self._stop.is_set():
                    log.exception(f"{self.settings.run_id}: epoch {self.epoch} failed; retrying")
                    self._stop.wait(0.5)

    def poke(self) -> None:
        """A micro-batch of the current step was served: the step may close soon, read the records more often."""
        self._poked = time.monotonic()

    def wake(self) -> None:
        """A trainer closed a step (its notice): read the step records now."""
        self._notified = True
        self._wake.set()

    def replica_epochs(self) -> dict[str, int]:
        """Peer id -> announced epoch of this span's replicas (this one included)."""
        return {p: e for p, (e, _) in self.replicas().items()}

    def replica_failures(self) -> dict[str, int]:
        """Peer id -> the last epoch whose all-reduce failed, of the replicas that announce one."""
        return {p: f for p, (_, f) in self.replicas().items() if f >= 0}

    def _others(self, status: dict[str, tuple[int, int]] | None = None) -> dict[str, int]:
        """Announced epochs of the other replicas (from ``status``, else read now), less those found gone while
        they still announce the epoch they had then (a killed replica's record outlives it by up to three
        announce periods)."""
        status = self.replicas() if status is None else status
        return {p: e for p, (e, _) in status.items() if p != self.peer_id and self.gone.get(p) != e}

    def end_epoch(self, contents: StepContents, status: dict[str, tuple[int, int]] | None = None) -> None:
        """All-reduce this step's gradients with every live replica, apply them, move to the next epoch.

        ``status``: the replicas' announcements, if already read (else they are read now)."""
        epoch = self.epoch
        sums, samples = self.take_gradients(contents)
        mean = [s / samples for s in sums] if samples else [torch.zeros_like(s) for s in sums]
        others = self._others(status)
        if not others:
            if samples == 0:
                log.warning(f"{self.settings.run_id} epoch {epoch}: no gradients held and no other replica")
            self.apply(epoch, mean, "no other replica, local gradients")
            return
        started = time.perf_counter()
        averaged = self.all_reduce(epoch, mean, samples, contents)
        self.on_averaging(averaged is not None, time.perf_counter() - started)
        if averaged is not None:
            self.apply(epoch, averaged, f"averaged gradients ({time.perf_counter() - started:.1f} s)")
        else:
            self.repair(epoch, mean)

    def all_reduce(
        self, epoch: int, mean: list[torch.Tensor], samples: int, contents: StepContents
    ) -> list[torch.Tensor] | None:
        """Weighted average (weight = samples held) with the replicas at this epoch; None if it failed."""
        self.averager.set_group_bits(self._bits(epoch))
        self._keep(epoch, samples, mean)
        self._load_buffers(mean)
        seed = sketch_seed(self.settings.run_id, epoch)
        mine = {"epoch": epoch, "digest": contents.digest(), "samples": samples, "norm": global_norm(mean),
                "sketch": sketch(mean, seed).tolist()}  # fmt: skip
        partial_before = self._partial.count.value
        try:
            control = self.averager.step(
                weight=float(samples), gather=mine, timeout=self.settings.averaging_timeout, allow_retries=True,
                wait=False,
            )  # fmt: skip
            gathered = self._result_unless_alone(epoch, control)
        except Exception as exc:
            log.warning(f"{self.settings.run_id} epoch {epoch}: all-reduce failed ({exc!r})")
            return None
        if not gathered:
            return None
        strangers = sorted(str(p) for p in gathered if str(p) != self.peer_id and not self.admits(str(p)))
        if strangers:
            self.strangers.update(strangers)
            log.warning(
                f"{self.settings.run_id} epoch {epoch}: refused the all-reduce result: {strangers} in the group "
                "are not roster members of this span"
            )
            return None
        declared = self._declared(gathered)
        if not self._name_outliers(epoch, *declared):  # from what each member declared: even if the rest failed
            return None
        if self._partial.count.value != partial_before:
            log.warning(f"{self.settings.run_id} epoch {epoch}: the all-reduce returned only part of the results")
            return None
        infos = [v for v in gathered.values() if isinstance(v, dict)]
        if len(infos) != len(gathered) or any(
            i.get("epoch") != epoch or i.get("digest") != mine["digest"] or type(i.get("samples")) is not int
            for i in infos
        ):
            log.warning(f"{self.settings.run_id} epoch {epoch}: group disagreed on the step: {infos}")
            return None
        total = sum(int(i["samples"]) for i in infos)
        if total == 0:
            log.warning(f"{self.settings.run_id} epoch {epoch}: nobody in the group held gradients")
            return None
        if total != contents.samples:
            self.incomplete_epochs += 1
            log.warning(
                f"{self.settings.run_id} epoch {epoch}: the group held {total} of the step's {contents.samples} "
                "samples (a replica that served some died or missed the group)"
            )
        averaged = self._read_buffers()
        members = [str(p) for p in gathered]
        if not self._consistent(epoch, averaged, seed, declared):
            return self.recompute(epoch, averaged, members, seed, declared)
        if self._audit_due(epoch, averaged):
            return self.audit(epoch, averaged, members, seed, declared)
        return averaged

    def _result_unless_alone(self, epoch: int, control: Any) -> Any:
        """The all-reduce's gathered metadata; None once no other replica is left to average with.

        hivemind looks for a group until ``averaging_timeout`` (30 s): a replica killed after it announced this
        epoch would hold the others that long. After ``matchmaking_time``, every second, each other replica is
        asked ``rpc_info``; one that fails twice in a row is gone (``self.gone``), and when all are, the step is
        cancelled (hivemind's ``StepControl.cancel``) and repaired at once (it steps on local gradients).
        """
        started = time.monotonic()
        misses: dict[str, int] = {}
        while True:
            try:
                return control.result(timeout=1.0)
            except TimeoutError:
                pass
            if self._stop.is_set():
                control.cancel()
                return None
            if time.monotonic() - started < self.settings.matchmaking_time:
                continue
            others = self._others()
            for peer, announced in others.items():
                misses[peer] = 0 if self.alive(peer) else misses.get(peer, 0) + 1
                if misses[peer] >= 2:
                    self.gone[peer] = announced
            if not self._others():
                control.cancel()
                log.warning(
                    f"{self.settings.run_id} epoch {epoch}: no other replica answers ({sorted(others)}): "
                    "abandoned the all-reduce"
                )
                return None

    @staticmethod
    def _declared(
        gathered: dict[Any, Any],
    ) -> tuple[dict[str, float], dict[str, float], dict[str, torch.Tensor | None]]:
        """Each member's declared gradient norm (NaN when missing or not a number), sample weight and gradient
        sketch (None when missing or malformed)."""
        norms: dict[str, float] = {}
        weights: dict[str, float] = {}
        sketches: dict[str, torch.Tensor | None] = {}
        for peer, info in gathered.items():
            info = info if isinstance(info, dict) else {}
            norm = info.get("norm")
            norms[str(peer)] = float(norm) if isinstance(norm, float | int) and not isinstance(norm, bool) else math.nan
            samples = info.get("samples", 0)
            weights[str(peer)] = float(samples) if isinstance(samples, int) and not isinstance(samples, bool) else 0.0
            found = info.get("sketch")
            ok = isinstance(found, list) and len(found) == SKETCH_SIZE
            ok = ok and all(isinstance(x, float | int) and not isinstance(x, bool) for x in found)  # type: ignore[union-attr]
            value = torch.tensor(found, dtype=torch.float64) if ok else None
            sketches[str(peer)] = value if value is not None and bool(torch.isfinite(value).all()) else None
        return norms, weights, sketches

    def _name_outliers(
        self,
        epoch: int,
        norms: dict[str, float],
        weights: dict[str, float],
        sketches: dict[str, torch.Tensor | None],
    ) -> bool:
        """swarm.sanity: name members whose declared gradient is out of line (suspects); False if any is.

        Out of line: its size (``outliers``), a missing or malformed sketch, or a direction against the others'
        (``against_the_group``: a sign-flipped gradient)."""
        named = outliers(norms, weights)
        named |= {p: "declared no valid gradient sketch" for p, s in sketches.items() if s is None and p not in named}
        valid = {p: s for p, s in sketches.items() if s is not None and p not in named}
        named |= against_the_group(valid, weights)
        if named:
            self.suspects.update(named)
            log.warning(f"{self.settings.run_id} epoch {epoch}: refused the all-reduce result: {named}")
            return False
        return True

    def _consistent(
        self,
        epoch: int,
        averaged: list[torch.Tensor],
        seed: int,
        declared: tuple[dict[str, float], dict[str, float], dict[str, torch.Tensor | None]],
    ) -> bool:
        """Refuse a result whose norm exceeds what the group declared (swarm.sanity.exceeds_bound), or whose
        sketch is not the weighted average of the declared sketches (swarm.sanity.sketch_mismatch)."""
        norms, weights, sketches = declared
        valid = {p: s for p, s in sketches.items() if s is not None}  # all are: _name_outliers refused the rest
        why = ""
        if not all(torch.isfinite(a).all() for a in averaged):
            why = "it is not finite"
        elif exceeds_bound(global_norm(averaged), norms, weights):
            why = f"its norm exceeds what the group declared ({norms})"
        elif (off := sketch_mismatch(sketch(averaged, seed), valid, weights)) > SKETCH_TOLERANCE:
            why = f"its sketch is {off:.2g} (relative) away from what the group declared"
        if why:
            self.inconsistent_epochs += 1
            log.warning(
                f"{self.settings.run_id} epoch {epoch}: refused the all-reduce result: {why}: a member sent other "
                "gradients than it said, or returned a wrong average for its part; asking the members for theirs"
            )
            return False
        return True

    # --- an inconsistent all-reduce: the members show what they brought ------------------------------------
    def _keep(self, epoch: int, samples: int, mean: list[torch.Tensor]) -> None:
        with self.lock:
            self._kept[epoch] = (samples, [m.detach().cpu().clone() for m in mean])
            for old in sorted(self._kept)[:-KEPT_CONTRIBUTIONS]:
                del self._kept[old]

    def shown(self, epoch: int) -> Contribution | None:
        """What this replica brought to the all-reduce of ``epoch`` (samples, mean gradient), if still kept."""
        with self.lock:
            return self._kept.get(epoch)

    def recompute(
        self,
        epoch: int,
        averaged: list[torch.Tensor],
        members: list[str],
        seed: int,
        declared: tuple[dict[str, float], dict[str, float], dict[str, torch.Tensor | None]],
    ) -> list[torch.Tensor] | None:
        """The epoch's exact weighted average, from what every member that holds samples shows us directly
        (``averaged``: the group's result, found inconsistent).

        hivemind does not say which member reduced which part, and a sender that lied to a reducer looks the same
        as a reducer that lied, so a wrong result names nobody. Instead every member shows the gradient it
        brought (``contribution``: over the span transport, roster members of this span only) and it must be
        the one it declared before the all-reduce (samples, norm and sketch; exact). A member that answers with
        anything else is named. If every member shows its declared gradient, each replica computes the average
        itself, summed in peer-id order, so replicas that recompute agree bitwise, and the epoch is not lost to
        one wrong part. If a member does not answer or refuses (dead, too slow, its roster view does not list us
        yet), the result stays refused (repair) and nobody is named."""
        average, shown = self._shown_average(epoch, members, seed, declared)
        if average is not None:
            self.recomputed_epochs += 1
            log.info(
                f"{self.settings.run_id} epoch {epoch}: recomputed the average from what {len(shown)} members showed"
            )
            self._audit_in_pairs(epoch, shown, averaged)
        return average

    def _audit_in_pairs(self, epoch: int, shown: dict[str, Contribution], result: list[torch.Tensor]) -> None:
        """Name the member that made the group's result wrong although every member showed what it declared.

        In the group, a sender that lied to a reducer looks the same as a reducer that lied. In a pair it does
        not: this replica knows both gradients (its own and the one shown) and reduces half of the vector itself,
        so a pair result other than their weighted average was made by the other member, as sender or as
        reducer. The group's members average again in every pair (hivemind, group bits of the pair), in one
        order on every member (sorted pairs: no member waits on a cycle); this replica names each partner whose
        pair result is wrong. A pair that does not form or fails names nobody. A group of two was a pair already
        (``result``, the group's, is the pair's).
        """
        holding = sorted(shown)
        if self.peer_id not in shown or not 2 <= len(holding) <= MAX_PAIR_AUDIT:
            return
        named: dict[str, str] = {}
        # pair k forms once both members are done with their earlier pairs: give it until its turn has passed
        started, turn = time.monotonic(), self.settings.matchmaking_time + 2.0
        for k, (a, b) in enumerate((a, b) for i, a in enumerate(holding) for b in holding[i + 1 :]):
            if self.peer_id not in (a, b):
                continue
            other = b if a == self.peer_id else a
            mine, theirs = shown[self.peer_id], shown[other]
            timeout = max(started + (k + 1) * turn - time.monotonic(), turn)
            got = self._pair_average(epoch, (a, b), mine, timeout) if len(holding) > 2 else result
            if got is None:
                continue
            total = mine[0] + theirs[0]
            expected = [(m * mine[0] + t * theirs[0]) / total for m, t in zip(mine[1], theirs[1], strict=True)]
            off = global_norm([g - e for g, e in zip(got, expected, strict=True)]) / max(global_norm(expected), 1e-12)
            if off > 1e-5:
                named[other] = (
                    f"made the pair average of epoch {epoch} wrong ({off:.2g} relative): it sent or returned other "
                    "values than the gradient it showed"
                )
        if named:
            self.suspects.update(named)
            log.warning(f"{self.settings.run_id} epoch {epoch}: audit in pairs: {named}")

    def _pair_average(
        self, epoch: int, pair: tuple[str, str], mine: Contribution, timeout: float
    ) -> list[torch.Tensor] | None:
        """Average ``mine`` with the other member of ``pair`` alone (None if the pair did not form within
        ``timeout`` or failed)."""
        digest = hashlib.sha256(f"{self.settings.run_id}/{epoch}/{pair[0]}/{pair[1]}".encode()).digest()
        self.averager.set_group_bits(format(int.from_bytes(digest[:6], "big"), f"0{PAIR_BITS}b"))
        self._load_buffers(mine[1])
        partial_before = self._partial.count.value
        timeout = min(self.settings.averaging_timeout, timeout)
        try:
            control = self.averager.step(
                weight=float(mine[0]), gather={"pair": list(pair), "epoch": epoch}, timeout=timeout,
                allow_retries=True, wait=False,
            )  # fmt: skip
            gathered = control.result(timeout=timeout + 5)
        except Exception as exc:
            log.info(f"{self.settings.run_id} epoch {epoch}: the pair {pair} did not average ({exc!r})")
            return None
        if not gathered or {str(p) for p in gathered} != set(pair) or self._partial.count.value != partial_before:
            return None
        return self._read_buffers()

    def _load_buffers(self, tensors: list[torch.Tensor]) -> None:
        """What this replica brings to the next all-reduce (the averager's buffers)."""
        with self.averager.get_tensors() as buffers:
            for b, t in zip(buffers, tensors, strict=True):
                b.copy_(t)

    def _read_buffers(self) -> list[torch.Tensor]:
        """A copy of the averager's buffers (after an all-reduce: its result)."""
        with self.averager.get_tensors() as buffers:
            return [b.detach().clone() for b in buffers]

    def _audit_due(self, epoch: int, averaged: list[torch.Tensor]) -> bool:
        """Whether to audit this epoch (``audit_rate`` of epochs): decided from the result, which no member can
        predict to 4 digits before it sends its gradient, so replicas of a group audit the same epochs."""
        rate = self.settings.audit_rate
        if rate <= 0 or rate >= 1:
            return rate >= 1
        digest = hashlib.sha256(f"{self.settings.run_id}/{epoch}/{global_norm(averaged):.4g}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < rate

    def audit(
        self,
        epoch: int,
        averaged: list[torch.Tensor],
        members: list[str],
        seed: int,
        declared: tuple[dict[str, float], dict[str, float], dict[str, torch.Tensor | None]],
    ) -> list[torch.Tensor] | None:
        """Check a consistent result against the gradients the members show (see :meth:`recompute`).

        The sketch checks can be fooled by a member that knows the sketch's seed (it is public): it can send a
        gradient flipped everywhere except what the sketch sees. Shown whole, its direction is checked on the full
        vectors (``against_the_group``): named, refused. A result that is not the average of what the members
        show (one sent other gradients than it shows, under the same norm and sketch) is replaced by that
        average, and who made it wrong is looked for in pairs (:meth:`_audit_in_pairs`)."""
        average, shown = self._shown_average(epoch, members, seed, declared)
        if average is None:
            return None
        self.audited_epochs += 1
        flat = {p: torch.cat([g.reshape(-1) for g in grads]).double() for p, (_, grads) in shown.items()}
        named = against_the_group(flat, {p: float(n) for p, (n, _) in shown.items()})
        if named:
            self.suspects.update(named)
            log.warning(f"{self.settings.run_id} epoch {epoch}: audit: refused the all-reduce result: {named}")
            return None
        off = global_norm([a - b for a, b in zip(averaged, average, strict=True)]) / max(global_norm(average), 1e-12)
        if off > 1e-5:
            log.warning(
                f"{self.settings.run_id} epoch {epoch}: audit: the all-reduce result is {off:.2g} (relative) away "
                "from the average of what the members showed; using theirs"
            )
            self._audit_in_pairs(epoch, shown, averaged)
            return average
        log.info(f"{self.settings.run_id} epoch {epoch}: audit: {len(shown)} members showed what they sent")
        return averaged

    def _shown_average(
        self,
        epoch: int,
        members: list[str],
        seed: int,
        declared: tuple[dict[str, float], dict[str, float], dict[str, torch.Tensor | None]],
    ) -> tuple[list[torch.Tensor] | None, dict[str, Contribution]]:
        """Ask every member that holds samples for the gradient it brought; name those whose answer contradicts
        their declaration. The samples-weighted average of what they showed (summed in peer-id order), or None
        when a member was named or did not answer."""
        norms, weights, sketches = declared
        shown: dict[str, Contribution] = {}
        named: dict[str, str] = {}
        for peer in sorted(p for p in members if weights.get(p, 0) > 0):
            if peer == self.peer_id:
                mine = self.shown(epoch)
                if mine is None:
                    return None, shown
                shown[peer] = mine
                continue
            try:
                got = self.contribution(peer, epoch)
                why = self._contradicts(got, norms[peer], weights[peer], sketches[peer], seed)
            except NotShownError as exc:
                named[peer] = f"did not show the gradient it brought to epoch {epoch}: {exc}"
                continue
            except Exception as exc:
                log.warning(f"{self.settings.run_id} epoch {epoch}: {peer} did not show its gradient ({exc!r})")
                return None, shown
            if why:
                named[peer] = why
            else:
                shown[peer] = got
        if named:
            self.suspects.update(named)
            log.warning(f"{self.settings.run_id} epoch {epoch}: members that did not show what they declared: {named}")
            return None, shown
        total = sum(n for n, _ in shown.values())
        if total == 0:
            return None, shown
        sums = [torch.zeros_like(p, dtype=torch.float32, device="cpu") for p in self.params]
        for peer in sorted(shown):
            n, grads = shown[peer]
            for acc, g in zip(sums, grads, strict=True):
                acc.add_(g, alpha=float(n))
        return [acc / total for acc in sums], shown

    def _contradicts(
        self, got: Contribution, norm: float, weight: float, declared: torch.Tensor | None, seed: int
    ) -> str:
        """Why a shown contribution is not the one its member declared ("" if it is)."""
        samples, grads = got
        if samples != int(weight):
            return f"showed {samples} samples, declared {int(weight)}"
        if len(grads) != len(self.params) or any(g.shape != p.shape for g, p in zip(grads, self.params, strict=True)):
            return "showed tensors of other shapes than this span's LoRA parameters"
        if any(g.dtype != torch.float32 for g in grads) or not all(torch.isfinite(g).all() for g in grads):
            return "showed a gradient that is not finite float32"
        if abs(global_norm(grads) - norm) > 1e-6 * norm + 1e-12:
            return f"showed a gradient of norm {global_norm(grads):.6g}, declared {norm:.6g}"
        if declared is None or sketch_mismatch(sketch(grads, seed), {"it": declared}, {"it": 1.0}) > 1e-6:
            return "showed a gradient whose sketch is not the one it declared"
        return ""

    def repair(self, epoch: int, mean: list[torch.Tensor]) -> None:
        """After a failed all-reduce, decided over what replicas announce (no settle window).

        This replica announces that its all-reduce of ``epoch`` failed. One all-reduce can fail on one side only
        (hivemind's "received 75% results": the other side got every part and applies the full average), so a
        replica still at ``epoch`` that has not announced a failure may yet reach the next epoch: wait for each to
        do one or the other. Then copy a replica that reached the next epoch (exact); if none did, every replica
        at this epoch failed, and each of them skips the epoch's update (drops its gradients): they stay identical
        and no replica's local gradients are trusted (a hostile replica's, whose declarations nobody has seen,
        would be copied by all; with Adam, x100 gradients poison the second moments for many steps). After
        ``averaging_timeout`` without an answer, step on local gradients.
        """
        self.failed_epoch = epoch
        self.announce()
        deadline = time.monotonic() + self.settings.averaging_timeout
        while not self._stop.is_set():
            status = self.replicas()
            epochs = self._others(status)
            if any(e > epoch for e in epochs.values()) and self.catch_up():
                return
            failed = {p: f for p, (_, f) in status.items()}
            here = {p for p, e in epochs.items() if e == epoch and p not in self.suspects}
            undecided = [p for p in here if failed.get(p) != epoch]
            if time.monotonic() > deadline:
                self.apply(epoch, mean, f"all-reduce failed, no answer from {undecided}: stepped on local gradients")
                return
            if not undecided:
                self.apply(epoch, None, f"all-reduce failed on every replica at this epoch ({len(here) + 1}): "
                                        "skipped its update (its gradients are dropped on every replica alike)")  # fmt: skip
                return
            self._stop.wait(0.1)

    def apply(self, epoch: int, grads: list[torch.Tensor] | None, outcome: str) -> None:
        """Step on ``grads`` and move to the next epoch; ``None`` skips the update (parameters and optimizer state
        unchanged: see :meth:`repair`)."""
        with self.lock:
            if self.epoch != epoch:
                return
            self.version += 1
            if grads is None:
                self.skipped_epochs += 1
            else:
                for p, g in zip(self.params, grads, strict=True):
                    p.grad = g.to(p.device, p.dtype)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            self._advance(epoch + 1)
        (log.info if grads is not None else log.warning)(f"{self.settings.run_id} epoch {epoch}: {outcome}")
        self.announce()
        self.on_epoch(epoch + 1)

    def wait_for(self, epoch: int, timeout: float) -> int:
        """Block until this replica's epoch is at least ``epoch`` (or ``timeout``); returns the epoch."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while self.epoch < epoch and not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.changed.wait(min(left, 0.5))
            return self.epoch

    def shutdown(self) -> None:
        logging.getLogger("hivemind.averaging.partition").removeHandler(self._partial)
        self._stop.set()
        self._wake.set()
        with self.changed:
            self.changed.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._reader.shutdown(wait=False, cancel_futures=True)
        self.averager.shutdown()
