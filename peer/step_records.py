"""A trainer's record in the swarm-wide step protocol (swarm.steps), kept alive in the DHT."""

from __future__ import annotations

import threading

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.logging import get_logger

from peer.announce import signing_binding
from swarm.dht_records import StepContribution, TrainerRecord, trainers_key
from swarm.identity import PeerIdentity
from swarm.steps import KEPT_STEPS

log = get_logger(__name__)
#: A trainer record lives this long after its last publication (a dead trainer stops being waited for then).
RECORD_TTL = 6.0


class StepRecorder:
    """Publishes this trainer's step record on every transition and re-publishes it every ``period`` seconds."""

    def __init__(
        self,
        dht: hivemind.DHT,
        round_id: str,
        identity: PeerIdentity,
        period: float = 1.0,
        private_key: RSAPrivateKey | None = None,
    ):
        """``identity`` (the DHT node's libp2p key) signs the record's subkey (peer.announce.signing_binding)."""
        self.dht, self.round_id, self.period = dht, round_id, period
        self.subkey = RSASignatureValidator(private_key).local_public_key
        binding = signing_binding(dht, identity, round_id, self.subkey)
        self.record = TrainerRecord(
            peer_id=str(dht.peer_id), step=0, identity_key=binding["identity_key"], binding=binding["binding"]
        )
        self._published = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="step-record", daemon=True)

    def publish(self, ttl: float = RECORD_TTL) -> bool:
        with self._lock:
            value = self.record.dict()
        return bool(
            self.dht.store(
                trainers_key(self.round_id), subkey=self.subkey, value=value, expiration_time=get_dht_time() + ttl
            )
        )

    def open(self, step: int) -> None:
        """Working on ``step`` now (published before any of its micro-batches is sent)."""
        with self._lock:
            if self.record.step == step and not self.record.closed and self._published:
                return  # close(..., next_step=step) already said so
            self.record = self.record.copy(update={"step": step, "closed": False})
        self._publish_or_warn()
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()

    def close(self, step: int, microbatches: list[int], samples: int, next_step: int | None = None) -> None:
        """Every micro-batch of ``step`` is done; these completed (backward through every span).

        With ``next_step``, the same publication also opens the next step (one DHT store per step, not two).
        """
        done = StepContribution(step=step, microbatches=sorted(microbatches), samples=samples)
        with self._lock:
            kept = [c for c in self.record.closed_steps if c.step != step][-(KEPT_STEPS - 1) :]
            position = {"step": step, "closed": True} if next_step is None else {"step": next_step, "closed": False}
            self.record = self.record.copy(update={**position, "closed_steps": [*kept, done]})
        self._publish_or_warn()

    def finish(self) -> None:
        """No more steps from this trainer; the record stays readable a while so spans can end the last step."""
        self._stop.set()
        with self._lock:
            if self.record.done:
                return
            self.record = self.record.copy(update={"done": True})
        self._publish_or_warn(ttl=10 * RECORD_TTL)

    def _publish_or_warn(self, ttl: float = RECORD_TTL) -> None:
        for _ in range(3):
            try:
                if self.publish(ttl):
                    self._published = True
                    return
            except Exception as exc:
                log.warning(f"publishing the step record failed: {exc!r}")
        log.warning("the DHT did not accept our step record; retrying in the background")

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.publish()
            except Exception as exc:
                log.warning(f"re-publishing the step record failed: {exc!r}")
