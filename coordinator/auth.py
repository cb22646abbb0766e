"""Who may call what: join challenges, identity proofs, per-membership credentials, rate limits.

- **Challenges** are stateless until used: ``<unix time>.<random>.<HMAC>`` under a per-process secret,
  so handing one out (GetRoundSpec) stores nothing. A challenge is accepted once, within
  ``challenge_ttl_s``; used ones are remembered until they expire (a replayed Join is refused).
- **Identity.** ``Join`` carries the libp2p public key its ``peer_id`` derives from and that key's
  signature over :func:`swarm.identity.join_payload` (challenge included): a member is its key.
- **Credentials.** An accepted Join returns a random bearer token; the store keeps only its sha256.
  Every state-changing call names its ``peer_id`` and must carry that membership's token.
- **Rate limits.** A token bucket per identity (peer id, or the caller's address before it has one).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import grpc

from coordinator.state import MemberRecord
from coordinator.validation import HandlerError
from swarm.identity import IdentityError, join_payload, verify_peer_signature
from swarm.proto import coordinator_pb2 as pb


def credential_digest(credential: str) -> str:
    return hashlib.sha256(credential.encode()).hexdigest()


def new_credential() -> tuple[str, str]:
    """``(token, sha256 of token)``: the token goes to the peer, the digest to the store."""
    token = secrets.token_urlsafe(32)
    return token, credential_digest(token)


def unauthenticated(message: str) -> HandlerError:
    return HandlerError(grpc.StatusCode.UNAUTHENTICATED, message)


def check_credential(member: MemberRecord | None, peer_id: str, credential: str) -> MemberRecord:
    """The member if ``credential`` is its current one, else UNAUTHENTICATED (same answer for a non-member)."""
    ok = member is not None and bool(member.credential_sha256) and bool(credential)
    if ok:
        assert member is not None
        ok = hmac.compare_digest(credential_digest(credential), member.credential_sha256)
    if not ok or member is None:
        raise unauthenticated(
            f"credential for peer {peer_id[:64]} is missing or wrong: act only for yourself, with the "
            f"credential your own Join returned (Join again to get a new one)"
        )
    return member


class Challenges:
    """Issue and redeem single-use Join challenges (thread-safe)."""

    def __init__(self, ttl_s: float = 60.0, clock: Callable[[], float] = time.time, max_used: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self._secret = secrets.token_bytes(32)
        self._clock = clock
        self._used: OrderedDict[str, float] = OrderedDict()  # challenge -> expiry, oldest first
        self._max_used = max_used
        self._lock = threading.Lock()

    def _now(self) -> float:
        return float(self._clock())

    def _mac(self, body: str) -> str:
        return hmac.new(self._secret, body.encode(), hashlib.sha256).hexdigest()[:32]

    def issue(self) -> str:
        body = f"{self._now():.3f}.{secrets.token_hex(8)}"
        return f"{body}.{self._mac(body)}"

    def redeem(self, challenge: str) -> None:
        """Accept ``challenge`` once; UNAUTHENTICATED if forged, expired or already used."""
        body, _, mac = challenge.rpartition(".")
        if not body or len(challenge) > 100 or not hmac.compare_digest(mac, self._mac(body)):
            raise unauthenticated("join challenge is missing or was not issued by this coordinator: "
                                  "take a fresh one from GetRoundSpec")  # fmt: skip
        now = self._now()
        issued = float(body.rsplit(".", 1)[0])  # the MAC held: the body is ours, "<time>.<random>"
        if not -0.001 <= now - issued <= self.ttl_s:  # the body's time is rounded to the millisecond
            raise unauthenticated(f"join challenge expired (older than {self.ttl_s:g} s): take a fresh one")
        with self._lock:
            while self._used and next(iter(self._used.values())) < now:
                self._used.popitem(last=False)
            if challenge in self._used:
                raise unauthenticated("join challenge was already used: take a fresh one from GetRoundSpec")
            if len(self._used) >= self._max_used:
                raise HandlerError(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many joins right now; retry later")
            self._used[challenge] = issued + self.ttl_s


def verify_join(challenges: Challenges, req: pb.JoinRequest) -> None:
    """Redeem the request's challenge and check its identity proof; UNAUTHENTICATED naming what failed."""
    try:
        payload = join_payload(req.peer_id, req.round_id, req.challenge, req.base_fingerprint, list(req.multiaddrs))
        verify_peer_signature(req.peer_id, req.public_key, payload, req.signature)
    except IdentityError as e:
        raise unauthenticated(f"identity proof refused: {e}") from None
    challenges.redeem(req.challenge)


class RateLimiter:
    """Token bucket per key: ``rate`` calls per second on average, bursts up to ``burst`` (0 rate = off)."""

    def __init__(self, rate: float, burst: float, max_keys: int = 50_000) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, last time)
        self._lock = threading.Lock()

    def allow(self, key: str, now: float | None = None) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            allowed = tokens >= 1.0
            self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
            while len(self._buckets) > self.max_keys:  # forget the least recently seen
                self._buckets.popitem(last=False)
            return allowed
