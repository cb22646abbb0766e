"""The small interfaces between a peer's parts: what it has done (PeerStats) and what it is told (RoundSignals)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class PeerStats:
    """What this peer did in the round: the trainer and the throughput probe write it, heartbeats read it."""

    samples: int = 0
    tokens: int = 0
    last_loss: float = 0.0
    throughput: float = 0.0  # samples/s of forward+backward on this peer's span (announced for routing)
    bytes_sent: int = 0  # activations and gradients this trainer sent to remote spans
    bytes_received: int = 0
    caught: dict[str, str] = field(default_factory=dict)  # span servers that answered with bad data -> what
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def bad_output(self, peer_id: str, reason: str) -> None:
        """A span server answered this trainer with bad data (wrong shape, non-finite, undecodable)."""
        with self._lock:
            self.caught[peer_id] = reason[:200]

    def wire(self, sent: int, received: int) -> None:
        with self._lock:
            self.bytes_sent += sent
            self.bytes_received += received

    def trained(self, samples: int, tokens: int, loss: float) -> None:
        with self._lock:
            self.samples += samples
            self.tokens += tokens
            self.last_loss = loss


@dataclass
class RoundSignals:
    """Events that end a peer's work: ``stop`` (process-wide: SIGTERM/SIGINT), ``finalize`` (the coordinator ended
    training), ``round_over`` (leave this round, maybe rejoin the next)."""

    stop: threading.Event = field(default_factory=threading.Event)
    finalize: threading.Event = field(default_factory=threading.Event)
    round_over: threading.Event = field(default_factory=threading.Event)
