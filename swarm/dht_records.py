"""DHT keys and record schemas of a round (hivemind ``SchemaValidator`` + ``RSASignatureValidator``).

Each server announces itself under the round's ``servers`` key with its own signed subkey, so nobody can
overwrite another peer's record; the peer id a record names must have signed that subkey (``identity_key`` and
``binding``, see swarm.identity.dht_key_binding), so nobody can write a record in another peer's name. Readers ignore fields they do not know (forward compatibility, like petals'
``ServerInfo``). hivemind validates schemas with pydantic v1, hence ``pydantic.v1`` here.
"""

from __future__ import annotations

from typing import Any

from pydantic.v1 import (
    BaseModel,
    Extra,
    StrictBool,
    StrictStr,
    ValidationError,
    conbytes,
    confloat,
    conint,
    conlist,
    constr,
)

ONLINE = "online"  # the only state announced today; readers skip others


def dht_prefix(round_id: str) -> str:
    """Prefix of every DHT key of a round."""
    return f"loraswarm_{round_id}"


def servers_key(round_id: str) -> str:
    return f"{dht_prefix(round_id)}_servers"


def trainers_key(round_id: str) -> str:
    return f"{dht_prefix(round_id)}_trainers"


MAX_LAYERS = 10_000
#: a libp2p public key protobuf (RSA 4096: ~550 bytes) or a signature
MAX_KEY_BYTES = 1024
MAX_THROUGHPUT = 1e7  # samples/s: far above any real span server


class ServerAnnouncement(BaseModel):
    """What a peer tells the swarm about the span it serves."""

    peer_id: constr(strict=True, max_length=128)  # type: ignore[valid-type]
    span_start: conint(strict=True, ge=0, le=MAX_LAYERS)  # type: ignore[valid-type]
    span_end: conint(strict=True, ge=1, le=MAX_LAYERS)  # type: ignore[valid-type]
    # samples/s of forward+backward; finite and bounded (an infinite or huge claim must not draw all traffic)
    throughput: confloat(strict=True, ge=0.0, le=MAX_THROUGHPUT, allow_inf_nan=False)  # type: ignore[valid-type]
    state: constr(strict=True, max_length=32) = ONLINE  # type: ignore[valid-type]
    version: constr(strict=True, max_length=64) = ""  # type: ignore[valid-type]
    adapter_version: constr(strict=True, max_length=64) = ""  # type: ignore[valid-type]
    expert_uid: constr(strict=True, max_length=256) = ""  # type: ignore[valid-type]
    epoch: conint(strict=True, ge=0, lt=2**31) = 0  # type: ignore[valid-type]
    # the last epoch whose all-reduce failed here (-1: none); replicas repairing that epoch wait for this answer
    failed_epoch: conint(strict=True, ge=-1, lt=2**31) = -1  # type: ignore[valid-type]
    maddrs: conlist(constr(strict=True, max_length=256), max_items=16) = []  # type: ignore[valid-type]
    quantize: constr(strict=True, max_length=16) = ""  # type: ignore[valid-type]  # how the base is stored
    # swarm.identity.dht_key_binding: peer_id's libp2p key and its signature over the record's signing key
    identity_key: conbytes(strict=True, max_length=MAX_KEY_BYTES) = b""  # type: ignore[valid-type]
    binding: conbytes(strict=True, max_length=MAX_KEY_BYTES) = b""  # type: ignore[valid-type]

    class Config:
        extra = Extra.ignore

    @property
    def span(self) -> tuple[int, int]:
        return (int(self.span_start), int(self.span_end))


class StepContribution(BaseModel):
    """The micro-batches one trainer completed (backward through every span) in one swarm-wide step."""

    step: conint(strict=True, ge=0)  # type: ignore[valid-type]
    microbatches: list[conint(strict=True, ge=0, le=1_000_000)] = []  # type: ignore[valid-type]
    samples: conint(strict=True, ge=0, le=1_000_000_000) = 0  # type: ignore[valid-type]

    class Config:
        extra = Extra.ignore


class TrainerRecord(BaseModel):
    """A trainer's position in the swarm-wide step protocol (see swarm.steps), re-published every second.

    ``step`` is the step it works on (``closed``: its micro-batches for it are all done); ``closed_steps`` keeps
    its last few closed steps, so a span replica that reads late still learns what each step contained.
    """

    peer_id: StrictStr
    step: conint(strict=True, ge=0)  # type: ignore[valid-type]
    closed: StrictBool = False
    done: StrictBool = False
    closed_steps: list[StepContribution] = []
    identity_key: conbytes(strict=True, max_length=MAX_KEY_BYTES) = b""  # type: ignore[valid-type]
    binding: conbytes(strict=True, max_length=MAX_KEY_BYTES) = b""  # type: ignore[valid-type]

    class Config:
        extra = Extra.ignore


class SignedRoster(BaseModel):
    """The coordinator's signed roster (swarm.roster.sign_roster), stored under its DHT node's own subkey."""

    roster: constr(strict=True, max_length=8_000_000)  # type: ignore[valid-type]
    signature: constr(strict=True, max_length=256)  # type: ignore[valid-type]

    class Config:
        extra = Extra.ignore


class RoundRecordsSchema(BaseModel):
    """Schema of the DHT keys under :func:`dht_prefix`; subkeys carry the owner's public key.

    ``roster`` is a dictionary too: the coordinator stores under its own (signed) subkey, which nobody else can
    overwrite, and a regular value (which, with a later expiration, would replace the whole dictionary on a node)
    is refused by every node and reader that installs this schema. Readers take the newest roster whose
    Ed25519 signature verifies (swarm.roster.verify_roster), whatever subkey it came under.
    """

    servers: dict[bytes, ServerAnnouncement] | None = None
    trainers: dict[bytes, TrainerRecord] | None = None
    roster: dict[bytes, SignedRoster] | None = None


def parse_trainer_record(value: Any) -> TrainerRecord | None:
    """Read one trainer record; a malformed one is skipped (None)."""
    try:
        return TrainerRecord.parse_obj(value)
    except (ValidationError, TypeError):
        return None


def parse_announcement(value: Any) -> ServerAnnouncement | None:
    """Read one announcement; a malformed one is skipped (returns None) rather than breaking the reader."""
    try:
        return ServerAnnouncement.parse_obj(value)
    except (ValidationError, TypeError):
        return None


__all__ = [
    "ONLINE",
    "RoundRecordsSchema",
    "ServerAnnouncement",
    "SignedRoster",
    "StepContribution",
    "TrainerRecord",
    "dht_prefix",
    "parse_announcement",
    "parse_trainer_record",
    "servers_key",
    "trainers_key",
]
