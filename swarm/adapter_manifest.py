"""The signed ``manifest.json`` of a published adapter (pydantic v2, importable without torch).

A manifest is serialized deterministically by :func:`manifest_bytes` (sorted keys, compact separators,
ASCII, one trailing newline); those exact bytes are what ``manifest.sig`` signs. Readers ignore unknown
fields (a newer writer may add some) but refuse a ``format_version`` newer than they understand.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from swarm.config import LoraSettings

#: Version of the on-disk adapter format written by this code.
MANIFEST_FORMAT_VERSION = 1

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
ADAPTER_FILES: tuple[str, ...] = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MANIFEST_FILE, SIGNATURE_FILE)

#: Known values of :attr:`AdapterInfo.method` (others are accepted if they match ``[a-z0-9-]+``).
KNOWN_METHODS: tuple[str, ...] = ("round", "merge-linear", "merge-ties")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_METHOD = re.compile(r"^[a-z0-9][a-z0-9-]*$")


def utc_now_iso() -> str:
    """Current UTC time as ISO 8601 with seconds precision, e.g. ``2025-01-31T12:00:00+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)


class Contributor(_Record):
    """One peer's share of the training behind an adapter."""

    peer_id: str = Field(..., min_length=1, description="hivemind peer id (base58) of the contributor.")
    samples: int = Field(..., ge=0, description="Training samples (sequences) the peer contributed.")
    tokens: int = Field(0, ge=0, description="Training tokens the peer contributed.")


class ManifestLora(_Record):
    """LoRA hyper-parameters recorded in the manifest (mirrors the PEFT adapter_config.json)."""

    rank: int = Field(..., gt=0, description="LoRA rank r.")
    alpha: float = Field(..., gt=0, description="LoRA alpha; updates are scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout used in training.")
    target_modules: tuple[str, ...] = Field(..., min_length=1, description="Adapted linear modules, sorted.")

    @classmethod
    def from_settings(cls, lora: LoraSettings) -> ManifestLora:
        """The manifest record of round settings ``lora``."""
        return cls(
            rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, target_modules=tuple(sorted(lora.target_modules))
        )

    def to_settings(self) -> LoraSettings:
        """These hyper-parameters as :class:`swarm.config.LoraSettings` (default ``init_seed``)."""
        return LoraSettings(rank=self.rank, alpha=self.alpha, dropout=self.dropout, target_modules=self.target_modules)


class AdapterInfo(_Record):
    """What the publisher states about an adapter; :class:`Manifest` adds the format, hashes and LoRA."""

    version: str = Field(..., min_length=1, description="Version name chosen by the publisher, e.g. 'r3'.")
    parent_version: str | None = Field(None, description="Adapter this one continues from (None = fresh).")
    round_id: str = Field(..., min_length=1, description="Round that produced it (for merges, an id of the merge).")
    base_model: str = Field(..., min_length=1, description="Base model path or hub id it was trained on.")
    base_fingerprint: str = Field(..., min_length=1, description="Fingerprint of that base (swarm.checkpoint).")
    base_quantization: tuple[str, ...] = Field(
        (),
        description="How the span hosts stored that base's frozen weights while training ('none', 'nf4', 'int8'; "
        "each kind any member used). Empty: not recorded (adapters made before it was, merges).",
    )
    contributors: tuple[Contributor, ...] = Field((), description="Peers that trained it, with sample counts.")
    eval_loss_before: float | None = Field(None, description="Held-out loss of the parent (or base).")
    eval_loss_after: float | None = Field(None, description="Held-out loss with this adapter applied.")
    created_at: str = Field(default_factory=utc_now_iso, description="ISO 8601 creation time.")
    method: str = Field("round", description=f"How it was made: one of {KNOWN_METHODS} or a new kebab name.")
    parents: tuple[str, ...] = Field((), description="All parent versions (several for merges).")

    @field_validator("created_at")
    @classmethod
    def _iso_time(cls, v: str) -> str:
        try:
            datetime.fromisoformat(v)
        except ValueError:
            raise ValueError(f"created_at must be an ISO 8601 time, got {v!r}") from None
        return v

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if not _METHOD.match(v):
            raise ValueError(f"method must be lowercase kebab-case such as {', '.join(KNOWN_METHODS)}; got {v!r}")
        return v

    @field_validator("eval_loss_before", "eval_loss_after")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError(f"eval loss must be finite, got {v}")
        return v

    @model_validator(mode="after")
    def _parents_consistent(self) -> AdapterInfo:
        if self.parent_version is not None and self.parent_version not in self.parents:
            # the direct parent is always one of the parents
            object.__setattr__(self, "parents", (self.parent_version, *self.parents))
        if len(set(self.parents)) != len(self.parents):
            raise ValueError(f"parents must not repeat a version, got {list(self.parents)}")
        if self.version in self.parents:
            raise ValueError(f"adapter version {self.version!r} cannot be its own parent")
        return self

    @property
    def total_samples(self) -> int:
        return sum(c.samples for c in self.contributors)

    @property
    def total_tokens(self) -> int:
        return sum(c.tokens for c in self.contributors)


class Manifest(AdapterInfo):
    """Contents of ``manifest.json``: the publisher's statements plus format version, LoRA and hashes."""

    format_version: int = Field(MANIFEST_FORMAT_VERSION, ge=1, description="On-disk adapter format version.")
    lora: ManifestLora = Field(..., description="LoRA hyper-parameters of the weights.")
    weights_sha256: str = Field(..., description=f"Hex sha256 of the {ADAPTER_WEIGHTS_FILE} bytes.")
    config_sha256: str = Field(..., description=f"Hex sha256 of the {ADAPTER_CONFIG_FILE} bytes.")

    @field_validator("weights_sha256", "config_sha256")
    @classmethod
    def _hex_digest(cls, v: str) -> str:
        if not _SHA256.match(v):
            raise ValueError(f"expected 64 lowercase hex characters (sha256), got {v!r}")
        return v

    @field_validator("format_version")
    @classmethod
    def _supported(cls, v: int) -> int:
        if v > MANIFEST_FORMAT_VERSION:
            raise ValueError(
                f"adapter format_version {v} is newer than this loraswarm understands "
                f"({MANIFEST_FORMAT_VERSION}); upgrade loraswarm"
            )
        return v


def manifest_bytes(manifest: Manifest) -> bytes:
    """Deterministic serialization of ``manifest``: the exact bytes of ``manifest.json`` that get signed."""
    data: dict[str, Any] = manifest.model_dump(mode="json")
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return (text + "\n").encode("ascii")


def parse_manifest(data: bytes) -> Manifest:
    """Parse ``manifest.json`` bytes; ``ValueError`` (pydantic ``ValidationError``) names the bad field."""
    return Manifest.model_validate_json(data)
