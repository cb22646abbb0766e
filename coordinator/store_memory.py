"""In-memory :class:`~coordinator.state.CoordinatorStore` (tests, throwaway coordinators)."""

from __future__ import annotations

import threading
from dataclasses import replace

from coordinator.state import (
    AdapterRecord,
    AlreadyExists,
    Conflict,
    Contribution,
    CoordinatorStore,
    EvalReport,
    Heartbeat,
    JoinRejection,
    MemberRecord,
    MemberState,
    NotFound,
    RoundRecord,
    SpanStateUpload,
)
from swarm.proto import RoundState


class MemoryStore(CoordinatorStore):
    """Plain dicts behind one lock; records are immutable so they are shared, never copied."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._rounds: dict[str, RoundRecord] = {}
        self._members: dict[tuple[str, str], MemberRecord] = {}
        self._contributions: dict[tuple[str, str], Contribution] = {}
        self._span_states: dict[tuple[str, str, int, int], SpanStateUpload] = {}
        self._evals: list[EvalReport] = []
        self._adapters: dict[str, AdapterRecord] = {}
        self._rejections: list[JoinRejection] = []

    def create_round(self, record: RoundRecord) -> None:
        with self._lock:
            if record.round_id in self._rounds:
                raise AlreadyExists(f"round {record.round_id!r} already exists")
            self._rounds[record.round_id] = record

    def get_round(self, round_id: str) -> RoundRecord | None:
        with self._lock:
            return self._rounds.get(round_id)

    def list_rounds(self) -> list[RoundRecord]:
        with self._lock:
            return list(self._rounds.values())

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
        with self._lock:
            current = self._rounds.get(round_id)
            if current is None:
                raise NotFound(f"round {round_id!r} does not exist")
            if current.state is not expected:
                raise Conflict(f"round {round_id!r} is {current.state.value}, expected {expected.value}")
            updated = replace(
                current,
                state=state,
                started_at=current.started_at if started_at is None else started_at,
                ended_at=current.ended_at if ended_at is None else ended_at,
                reason=current.reason if reason is None else reason,
            )
            self._rounds[round_id] = updated
            return updated

    def put_member(self, member: MemberRecord) -> None:
        with self._lock:
            self._members_changed()
            if member.round_id not in self._rounds:
                raise NotFound(f"round {member.round_id!r} does not exist")
            self._members[(member.round_id, member.peer_id)] = member
            key = (member.round_id, member.peer_id)
            self._contributions.setdefault(key, Contribution(member.round_id, member.peer_id, 0, 0))

    def get_member(self, round_id: str, peer_id: str) -> MemberRecord | None:
        with self._lock:
            return self._members.get((round_id, peer_id))

    def list_members(self, round_id: str, state: MemberState | None = None) -> list[MemberRecord]:
        with self._lock:
            return [
                m for (rid, _), m in self._members.items() if rid == round_id and (state is None or m.state is state)
            ]

    def record_heartbeat(self, round_id: str, peer_id: str, beat: Heartbeat, now: float) -> MemberRecord:
        with self._lock:
            member = self._members.get((round_id, peer_id))
            if member is None:
                raise NotFound(f"peer {peer_id!r} is not a member of round {round_id!r}")
            d_samples = beat.samples - member.session_samples
            d_tokens = beat.tokens - member.session_tokens
            if d_samples < 0 or d_tokens < 0:
                raise Conflict(
                    f"progress went backwards: samples {member.session_samples} -> {beat.samples}, "
                    f"tokens {member.session_tokens} -> {beat.tokens}"
                )
            updated = replace(
                member,
                last_heartbeat=now,
                epoch=max(member.epoch, beat.epoch),
                loss=beat.loss if beat.loss is not None else member.loss,
                throughput=beat.throughput if beat.throughput > 0 else member.throughput,
                session_samples=beat.samples,
                session_tokens=beat.tokens,
            )
            old = self._contributions[(round_id, peer_id)]
            self._contributions[(round_id, peer_id)] = replace(
                old, samples=old.samples + d_samples, tokens=old.tokens + d_tokens
            )
            self._members[(round_id, peer_id)] = updated
            return updated

    def set_member_states(self, round_id: str, peer_ids: list[str], state: MemberState) -> None:
        with self._lock:
            self._members_changed()
            for pid in peer_ids:
                if (round_id, pid) in self._members:
                    self._members[(round_id, pid)] = replace(self._members[(round_id, pid)], state=state)

    def move_members(self, round_id: str, moves: dict[str, int]) -> None:
        with self._lock:
            self._members_changed()
            for pid, span_index in moves.items():
                if (round_id, pid) in self._members:
                    m = self._members[(round_id, pid)]
                    if m.span_index != span_index:
                        self._members[(round_id, pid)] = replace(m, span_index=span_index, epoch=0)

    def list_contributions(self, round_id: str) -> list[Contribution]:
        with self._lock:
            return [c for (rid, _), c in self._contributions.items() if rid == round_id]

    def put_span_state(self, upload: SpanStateUpload) -> None:
        with self._lock:
            key = (upload.round_id, upload.peer_id, upload.span_index, upload.epoch)
            self._span_states.pop(key, None)  # a replacement goes last, as in SQL
            self._span_states[key] = upload

    def list_span_states(self, round_id: str) -> list[SpanStateUpload]:
        with self._lock:
            return [u for u in self._span_states.values() if u.round_id == round_id]

    def add_eval_report(self, report: EvalReport) -> None:
        with self._lock:
            self._evals.append(report)

    def list_eval_reports(self, round_id: str | None = None) -> list[EvalReport]:
        with self._lock:
            return [e for e in self._evals if round_id is None or e.round_id == round_id]

    def count_eval_reports(self, round_id: str, peer_id: str) -> int:
        with self._lock:
            return sum(e.round_id == round_id and e.peer_id == peer_id for e in self._evals)

    def delete_eval_reports(self, round_id: str) -> int:
        with self._lock:
            kept = [e for e in self._evals if e.round_id != round_id]
            deleted, self._evals = len(self._evals) - len(kept), kept
            return deleted

    def add_adapter(self, record: AdapterRecord) -> None:
        with self._lock:
            if record.version in self._adapters:
                raise AlreadyExists(f"adapter version {record.version!r} already exists")
            self._adapters[record.version] = record

    def get_adapter(self, version: str) -> AdapterRecord | None:
        with self._lock:
            return self._adapters.get(version)

    def list_adapters(self) -> list[AdapterRecord]:
        with self._lock:
            return list(self._adapters.values())

    def add_rejection(self, rejection: JoinRejection) -> None:
        with self._lock:
            self._rejections.append(rejection)

    def list_rejections(self) -> list[JoinRejection]:
        with self._lock:
            return list(self._rejections)
