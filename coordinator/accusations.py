"""Members that catch another sending bad data say so in their heartbeats; a quorum of them removes it.

A span replica names a group member whose declared gradient is out of line (``peer.replica_group``, via
``swarm.sanity``); a trainer names a span server that answered with bad activations. Each live member's standing
accusations (accused peer id -> reason) replace its previous ones at every heartbeat. They are kept in memory: a
member re-sends them while they stand, so a coordinator restart loses nothing lasting.

A live member accused by ``quorum`` distinct live members is **expelled**: state ``expelled`` with the reason in its
record (status page, ``/api/status``), out of the signed roster (peers stop routing to it and averaging with it), its
span-state uploads refused and ignored at finalization, its contributions left out of the manifest, its heartbeats
answered ``stop`` and its Join refused for the rest of the round. The quorum is the larger of 2 and a strict
majority of the other live replicas of its span, so one hostile member cannot remove an honest one. A volunteer
with several approved identities could (join tokens and approved identities are the defence: SECURITY.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from coordinator.state import MemberRecord, MemberState
from coordinator.validation import check_name, invalid
from swarm.proto import coordinator_pb2 as pb

log = logging.getLogger(__name__)

MAX_ACCUSATIONS = 16
MAX_REASON_CHARS = 256


def parse(accuser: str, accusations: list[pb.Accusation]) -> dict[str, str]:
    """``accusations`` of one heartbeat as accused peer id -> reason; INVALID_ARGUMENT when malformed."""
    if len(accusations) > MAX_ACCUSATIONS:
        raise invalid(f"accusations: at most {MAX_ACCUSATIONS}, got {len(accusations)}")
    found: dict[str, str] = {}
    for i, a in enumerate(accusations):
        check_name(f"accusations[{i}].peer_id", a.peer_id)
        if a.peer_id == accuser:
            raise invalid(f"accusations[{i}]: a member cannot accuse itself")
        found[a.peer_id] = a.reason[:MAX_REASON_CHARS] or "no reason given"
    return found


@dataclass
class Accusations:
    """round id -> accuser -> accused -> reason (each accuser's latest heartbeat)."""

    rounds: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)

    def update(self, round_id: str, accuser: str, accused: dict[str, str]) -> bool:
        """Replace ``accuser``'s accusations; True when they changed. Only the round heartbeats go to is kept."""
        if set(self.rounds) - {round_id}:
            self.rounds = {round_id: self.rounds.get(round_id, {})}
        table = self.rounds.setdefault(round_id, {})
        if table.get(accuser, {}) == accused:
            return False
        if accused:
            table[accuser] = accused
        else:
            table.pop(accuser, None)
        return True

    def against(self, round_id: str) -> dict[str, dict[str, str]]:
        """accused -> accuser -> reason."""
        out: dict[str, dict[str, str]] = {}
        for accuser, accused in self.rounds.get(round_id, {}).items():
            for peer_id, reason in accused.items():
                out.setdefault(peer_id, {})[accuser] = reason
        return out


def quorum(members: list[MemberRecord], accused: MemberRecord) -> int:
    """Distinct live accusers needed: max(2, a strict majority of the other live replicas of its span)."""
    others = [m for m in members if m.live and m.span_index == accused.span_index and m.peer_id != accused.peer_id]
    return max(2, len(others) // 2 + 1)


def verdicts(members: list[MemberRecord], against: dict[str, dict[str, str]]) -> list[MemberRecord]:
    """The live members a quorum of distinct live members accuses, as their expelled records (pure)."""
    live = {m.peer_id: m for m in members if m.live}
    expelled = []
    for peer_id, accusers in sorted(against.items()):
        member = live.get(peer_id)
        if member is None:
            continue
        standing = {a: r for a, r in accusers.items() if a in live and a != peer_id}
        if len(standing) < quorum(members, member):
            continue
        named = "; ".join(f"{a}: {r}" for a, r in sorted(standing.items())[:3])
        reason = f"accused by {len(standing)} members ({named})"[:1024]
        expelled.append(replace(member, state=MemberState.EXPELLED, removed_reason=reason))
    return expelled
