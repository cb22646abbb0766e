"""The swarm-wide step: which micro-batches make up step ``s``, decided from the trainers' DHT records (pure).

Every span applies step ``s`` on the same samples. A trainer works on one step at a time: it publishes
``step=s`` (open), sends its share of the step's micro-batch slots through every span (requests are tagged with
``s``; a span serves step ``s`` only at epoch ``s``), then publishes ``step=s, closed`` with the micro-batches whose
backward went through *every* span. A span replica ends epoch ``s`` once every live trainer has closed ``s`` (or
moved past it, or is done), and applies exactly the declared micro-batches: a half-finished micro-batch (a trainer
that died or failed over mid-way) is dropped by every span alike. The next step's forwards wait for epoch ``s+1``
on every span (GPipe-style flush at the step boundary).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from swarm.dht_records import TrainerRecord

#: How many closed steps a trainer keeps in its record (a replica that reads late still sees what a step held).
KEPT_STEPS = 4

MicroBatchKey = tuple[str, int]  # (trainer peer id, micro-batch index within the step)


@dataclass(frozen=True)
class StepContents:
    """What step ``step`` contains: every trainer's completed micro-batches and their sample total."""

    step: int
    microbatches: frozenset[MicroBatchKey]
    samples: int

    def digest(self) -> str:
        """Short, order-independent name of the contents (replicas compare it before averaging)."""
        import hashlib

        text = ";".join(f"{p}:{i}" for p, i in sorted(self.microbatches))
        return hashlib.sha256(f"{self.step}|{self.samples}|{text}".encode()).hexdigest()[:16]


class Behind(Exception):
    """The trainers have moved past this step and no record tells what it held: download a replica's state."""


def slots_per_step(target_batch_size: int, micro_batch_size: int) -> int:
    """Micro-batch slots of one step (the round spec requires target_batch_size % micro_batch_size == 0)."""
    return max(target_batch_size // micro_batch_size, 1)


def share(slots: int, participants: Iterable[str], me: str) -> int:
    """My share of a step's slots: split evenly over the sorted participants, the first ones take the remainder."""
    ordered = sorted(set(participants) | {me})
    rank = ordered.index(me)
    base, extra = divmod(slots, len(ordered))
    return base + (1 if rank < extra else 0)


def participants(records: Sequence[TrainerRecord], step: int) -> list[str]:
    """Trainers taking part in ``step``: live and not done, not past it yet or already closed it (took their share)."""
    return [
        r.peer_id for r in records if (not r.done and r.step <= step) or any(c.step == step for c in r.closed_steps)
    ]


def step_contents(records: Sequence[TrainerRecord], step: int) -> StepContents | None:
    """What ``step`` holds, once every live trainer has closed it; None while some trainer still works on it.

    Raises :class:`Behind` when the trainers are past ``step + 1`` (the replicas they use stepped at least twice
    since), or past ``step`` with no record remembering it. Returns None as well when the trainers are done and
    nobody contributed anything (there is nothing to apply: the step does not happen).
    """
    if any(r.step > step + 1 for r in records):
        raise Behind(f"the trainers are at step {max(r.step for r in records)}, this replica at {step}")
    found: set[MicroBatchKey] = set()
    samples, remembered, waiting = 0, False, False
    for r in records:
        past = [c for c in r.closed_steps if c.step == step]
        if past:
            remembered = True
            found.update((r.peer_id, int(i)) for i in past[0].microbatches)
            samples += int(past[0].samples)
        elif not r.done and (r.step < step or (r.step == step and not r.closed)):
            waiting = True
    if waiting:
        return None
    if not remembered and any(r.step > step for r in records):
        raise Behind(f"the trainers are past step {step} and no record of it is left")
    if not found:
        return None
    return StepContents(step, frozenset(found), samples)


def current_step(records: Sequence[TrainerRecord], floor: int = 0) -> int:
    """The step a newly arriving trainer should work on: the open one, or the one after the last closed."""
    best = floor
    for r in records:
        if not r.done:
            best = max(best, r.step + 1 if r.closed else r.step)
    return best
