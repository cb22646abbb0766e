"""Coordinator state: typed records and the abstract store every implementation fulfils.

Two implementations exist (:mod:`coordinator.store_memory`, :mod:`coordinator.store_sqlite`); one
contract test suite runs against both. Each method is one atomic operation: a crash between two
calls may leave the second undone, never half of one. Callers serialise read-modify-write
sequences themselves (the handlers hold one lock) and keep those sequences convergent.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property

from swarm.config import RoundSpec
from swarm.proto import RoundState


class MemberState(str, Enum):
    """A peer's membership of one round."""

    LIVE = "live"  # heartbeating
    DEAD = "dead"  # missed heartbeats for longer than the timeout
    LEFT = "left"  # said goodbye (Leave)
    EXPELLED = "expelled"  # removed: a quorum of members caught it sending bad data (see removed_reason)


class StoreError(Exception):
    """Base of the errors a store raises; the message names the object."""


class NotFound(StoreError, KeyError):
    def __str__(self) -> str:  # KeyError would print the repr
        return str(self.args[0]) if self.args else ""


class AlreadyExists(StoreError):
    pass


class Conflict(StoreError):
    """The stored value is not the one the caller expected (stale read or a regression)."""


@dataclass(frozen=True)
class RoundRecord:
    round_id: str
    spec_json: str
    state: RoundState
    created_at: float
    started_at: float | None = None  # when training started
    ended_at: float | None = None  # when training stopped (finalizing or failed)
    parent_adapter: str = ""
    reason: str = ""  # why the round is in its state: end reason, failure reason, publish notes

    @cached_property
    def spec(self) -> RoundSpec:
        """The parsed spec (parsed once per record; records are immutable)."""
        return RoundSpec.from_json(self.spec_json)

    @classmethod
    def new(cls, spec: RoundSpec, now: float) -> RoundRecord:
        return cls(spec.round_id, spec.to_json(), RoundState.OPEN, now, parent_adapter=spec.parent_adapter)


@dataclass(frozen=True)
class Capacity:
    memory_bytes: int = 0
    device: str = ""
    throughput: float = 0.0
    max_blocks: int = 0  # the peer hosts spans of at most this many blocks (0 = no limit)
    quantize: str = ""  # how it stores the frozen base: "none", "nf4", "int8" ("" = not said)


@dataclass(frozen=True)
class MemberRecord:
    """One peer in one round. ``session_*`` are the cumulative counters of its current membership."""

    round_id: str
    peer_id: str
    span_index: int
    multiaddrs: tuple[str, ...] = ()
    capacity: Capacity = field(default_factory=Capacity)
    throughput: float = 0.0  # latest measured (capacity.throughput until a heartbeat reports one)
    joined_at: float = 0.0
    last_heartbeat: float = 0.0
    state: MemberState = MemberState.LIVE
    epoch: int = 0
    loss: float | None = None
    session_samples: int = 0
    session_tokens: int = 0
    credential_sha256: str = ""  # sha256 of the bearer credential its last Join issued ('' = none)
    pinned: bool = False  # the peer chose its span (--span / --span-index): rebalancing never moves it
    removed_reason: str = ""  # why it was expelled (who accused it of what)

    @property
    def live(self) -> bool:
        return self.state is MemberState.LIVE


@dataclass(frozen=True)
class Heartbeat:
    """Progress reported by a peer: cumulative counters since its last Join."""

    samples: int
    tokens: int
    epoch: int
    loss: float | None = None
    throughput: float = 0.0  # 0 keeps the previous value


@dataclass(frozen=True)
class Contribution:
    round_id: str
    peer_id: str
    samples: int
    tokens: int


@dataclass(frozen=True)
class SpanStateUpload:
    """A span's LoRA state uploaded by a peer; the bytes live at ``path`` (relative to the blob dir)."""

    round_id: str
    peer_id: str
    span_index: int
    epoch: int
    path: str
    sha256: str
    size_bytes: int
    samples: int
    uploaded_at: float


@dataclass(frozen=True)
class EvalReport:
    round_id: str
    peer_id: str
    adapter_version: str  # '' = the round's in-progress adapter at ``epoch``
    epoch: int
    eval_loss: float
    eval_tokens: int
    reported_at: float
    candidate_sha256: str = ""  # the candidate adapter it measured ('' = the peer's own view of the swarm)


@dataclass(frozen=True)
class AdapterRecord:
    version: str
    parents: tuple[str, ...]
    round_id: str
    path: str  # the adapter directory
    sha256: str  # of adapter_model.safetensors
    created_at: float
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None


@dataclass(frozen=True)
class Candidate:
    """A finalizing round's assembled adapter, waiting for its evaluators (kept in memory: re-assembling
    the same uploads gives the same bytes, so a restarted coordinator names the same sha256)."""

    round_id: str
    sha256: str  # of the candidate's safetensors bytes
    path: str  # the candidate's safetensors file
    evaluators: tuple[str, ...]  # peer ids picked to evaluate it
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class JoinRejection:
    peer_id: str
    round_id: str
    reason: str  # swarm.proto.RejectCode value
    detail: str
    at: float


def dump_tuple(values: tuple[str, ...]) -> str:
    return json.dumps(list(values))


def load_tuple(text: str) -> tuple[str, ...]:
    return tuple(json.loads(text))


class CoordinatorStore(ABC):
    """Everything the coordinator remembers. Lists come back in insertion order.

    ``members_generation`` changes whenever members change other than by :meth:`record_heartbeat` (join, state,
    move): a cache of the membership built at one generation (``coordinator.progress``) is current until it
    changes, and keeps itself current through heartbeats.
    """

    members_generation: int = 0

    def _members_changed(self) -> None:
        self.members_generation += 1

    # --- rounds
    @abstractmethod
    def create_round(self, record: RoundRecord) -> None:
        """Add a round; :class:`AlreadyExists` if its id is taken."""

    @abstractmethod
    def get_round(self, round_id: str) -> RoundRecord | None: ...

    @abstractmethod
    def list_rounds(self) -> list[RoundRecord]: ...

    @abstractmethod
    def set_round_state(
        self,
        round_id: str,
        state: RoundState,
        *,
        expected: RoundState,
        started_at: float | None = None,
        ended_at: float | None = None,
        reason: str | None = None,
    ) -> RoundRecord:
        """Compare-and-set the state (:class:`Conflict` if it is not ``expected``); set the given times and reason."""

    # --- members
    @abstractmethod
    def put_member(self, member: MemberRecord) -> None:
        """Insert or replace the (round, peer) membership; keeps the peer's contribution."""

    @abstractmethod
    def get_member(self, round_id: str, peer_id: str) -> MemberRecord | None: ...

    @abstractmethod
    def list_members(self, round_id: str, state: MemberState | None = None) -> list[MemberRecord]: ...

    @abstractmethod
    def record_heartbeat(self, round_id: str, peer_id: str, beat: Heartbeat, now: float) -> MemberRecord:
        """Apply a heartbeat and add the counters' increase to the peer's contribution, atomically.

        :class:`NotFound` if no such member; :class:`Conflict` if a counter went backwards.
        """

    @abstractmethod
    def set_member_states(self, round_id: str, peer_ids: list[str], state: MemberState) -> None: ...

    @abstractmethod
    def move_members(self, round_id: str, moves: dict[str, int]) -> None:
        """Reassign peers (peer id -> span index) in one transaction; a moved peer's epoch restarts at 0.

        (The epoch belongs to the old span's optimizer group; the next heartbeat from the new span sets it.)
        """

    # --- contributions
    @abstractmethod
    def list_contributions(self, round_id: str) -> list[Contribution]: ...

    # --- span state uploads, eval reports
    @abstractmethod
    def put_span_state(self, upload: SpanStateUpload) -> None:
        """Record an upload; replaces an earlier one of the same (round, peer, span, epoch)."""

    @abstractmethod
    def list_span_states(self, round_id: str) -> list[SpanStateUpload]: ...

    @abstractmethod
    def add_eval_report(self, report: EvalReport) -> None: ...

    @abstractmethod
    def list_eval_reports(self, round_id: str | None = None) -> list[EvalReport]: ...

    def count_eval_reports(self, round_id: str, peer_id: str) -> int:
        """How many reports ``peer_id`` made in ``round_id`` (stores answer without building every report)."""
        return sum(r.peer_id == peer_id for r in self.list_eval_reports(round_id))

    @abstractmethod
    def delete_eval_reports(self, round_id: str) -> int:
        """Forget a round's eval reports (retention); returns how many were deleted."""

    # --- adapters, rejections
    @abstractmethod
    def add_adapter(self, record: AdapterRecord) -> None:
        """Register a published adapter; :class:`AlreadyExists` if the version is taken."""

    @abstractmethod
    def get_adapter(self, version: str) -> AdapterRecord | None: ...

    @abstractmethod
    def list_adapters(self) -> list[AdapterRecord]: ...

    @abstractmethod
    def add_rejection(self, rejection: JoinRejection) -> None: ...

    @abstractmethod
    def list_rejections(self) -> list[JoinRejection]: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (files, connections)."""

    # --- derived queries shared by every implementation
    def active_round(self) -> RoundRecord | None:
        """The newest round that has not ended (open, training or finalizing)."""
        active = [r for r in self.list_rounds() if r.state.active]
        return active[-1] if active else None

    def current_round(self) -> RoundRecord | None:
        """The active round, else the newest round, else ``None``."""
        rounds = self.list_rounds()
        return self.active_round() or (rounds[-1] if rounds else None)
