"""What every handler works with: the store, the config, metrics, a clock and one lock."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.accusations import Accusations
from coordinator.auth import Challenges, RateLimiter
from coordinator.config import CoordinatorConfig
from coordinator.metrics import CoordinatorMetrics
from coordinator.progress import ProgressIndex
from coordinator.state import Candidate, CoordinatorStore, JoinRejection
from coordinator.store_memory import MemoryStore
from coordinator.store_sqlite import SqliteStore
from swarm.keys import sign_hex, spec_payload


@dataclass
class CoordinatorContext:
    """Shared by the gRPC servicer, the sweep thread and tests (which call handlers directly).

    ``lock`` serialises the read-modify-write sequences of handlers; each store call is atomic
    on its own, and every sequence converges if a crash cuts it short.
    """

    store: CoordinatorStore
    config: CoordinatorConfig
    metrics: CoordinatorMetrics = field(default_factory=CoordinatorMetrics)
    clock: Callable[[], float] = time.time
    lock: threading.RLock = field(default_factory=threading.RLock)
    dht_initial_peers: tuple[str, ...] = ()  # the coordinator DHT node's multiaddrs, sent in JoinResponse
    challenges: Challenges = field(init=False)  # single-use Join challenges on ``clock``
    rate: RateLimiter = field(init=False)  # per-identity call budget (config.rate_limit_*)
    #: The latest refused joins (kept in memory, bounded: refusals cost the caller nothing, so they must not grow the DB).
    rejections: deque[JoinRejection] = field(default_factory=lambda: deque(maxlen=200))
    #: members' standing accusations (coordinator/accusations.py; in memory: re-sent with every heartbeat)
    accusations: Accusations = field(default_factory=Accusations)
    #: The adapter signing key; also signs every round spec handed out (None in tests that need no signature).
    signing_key: Ed25519PrivateKey | None = None
    #: evaluator peer id -> sha256 of the credential its Join returned (in memory: it joins again after a restart)
    evaluator_credentials: dict[str, str] = field(default_factory=dict)
    #: round id -> the candidate adapter being evaluated (see :mod:`coordinator.publish`).
    candidates: dict[str, Candidate] = field(default_factory=dict)
    #: what heartbeats read instead of every member of the round (see :mod:`coordinator.progress`)
    progress: ProgressIndex = field(default_factory=ProgressIndex)

    def spec_signature(self, spec_json: str, nonce: bytes) -> str:
        """The coordinator's signature of a round spec for the asker's ``nonce`` ('' without a signing key)."""
        return sign_hex(self.signing_key, spec_payload(spec_json, nonce)) if self.signing_key is not None else ""

    def __post_init__(self) -> None:
        self.challenges = Challenges(self.config.challenge_ttl_s, self.clock)
        self.rate = RateLimiter(self.config.rate_limit_per_s, self.config.rate_limit_burst)

    @classmethod
    def from_config(cls, config: CoordinatorConfig, clock: Callable[[], float] = time.time) -> CoordinatorContext:
        """Open the store the config names and export its state metrics."""
        store: CoordinatorStore = SqliteStore(config.db_path) if config.store == "sqlite" else MemoryStore()
        ctx = cls(store=store, config=config, clock=clock)
        ctx.metrics.watch(store, clock)
        return ctx
