"""The coordinator's one config object (pydantic v2, validated at construction)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

import swarm
from swarm.config import RoundSpec


class CoordinatorConfig(BaseModel):
    """Everything a coordinator process needs; ``serve(config)`` takes nothing else."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="Interface for gRPC and /metrics (0.0.0.0 = every interface).")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = an ephemeral port, see .port).")
    metrics_port: int | None = Field(
        9400, ge=0, le=65535, description="HTTP port of /metrics and /health (0 = ephemeral, None = off)."
    )
    workdir: Path = Field(Path("swarm-work"), description="State lives in WORKDIR/coordinator/.")
    store: Literal["sqlite", "memory"] = Field(
        "sqlite", description="sqlite: WORKDIR/coordinator/state.sqlite3; memory: lost on exit (tests)."
    )
    round_spec: RoundSpec | None = Field(
        None, description="Round to open at start when no round is active (None = open nothing)."
    )
    join_token: str = Field("", description="Shared secret peers must send in Join ('' = anyone may join).")
    heartbeat_interval_s: float = Field(5.0, gt=0, description="How often peers are told to heartbeat.")
    heartbeat_timeout_s: float = Field(
        30.0, gt=0, description="A member silent for this long is marked dead and its span rebalanced."
    )
    sweep_interval_s: float = Field(
        0.0, ge=0, description="Period of the dead-member sweep (0 = heartbeat_timeout_s / 4, at most 5 s)."
    )
    max_message_mb: float = Field(
        64.0, gt=0, description="Largest gRPC message received or sent, in MiB (bigger: RESOURCE_EXHAUSTED)."
    )
    software_version: str = Field(
        swarm.__version__, description="Peers must run a loraswarm version with the same major.minor."
    )
    max_workers: int = Field(16, ge=1, description="Threads serving gRPC requests.")
    download_chunk_bytes: int = Field(1 << 20, ge=1024, description="Bytes per DownloadAdapter chunk.")
    stop_grace_s: float = Field(5.0, ge=0, description="Seconds in-flight RPCs get to finish on stop.")

    @model_validator(mode="after")
    def _check(self) -> CoordinatorConfig:
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"heartbeat_timeout_s ({self.heartbeat_timeout_s}) must exceed heartbeat_interval_s "
                f"({self.heartbeat_interval_s}), or every peer would time out between two heartbeats"
            )
        if self.download_chunk_bytes > self.max_message_bytes // 2:
            raise ValueError(
                f"download_chunk_bytes ({self.download_chunk_bytes}) must be at most half of max_message_mb"
            )
        return self

    @property
    def state_dir(self) -> Path:
        return self.workdir / "coordinator"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "state.sqlite3"

    @property
    def blob_dir(self) -> Path:
        """Uploaded span states: ``blob_dir/<round>/span<a>-<b>/<peer>.epoch<n>.safetensors``."""
        return self.state_dir / "span_states"

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * (1 << 20))

    @property
    def effective_sweep_interval_s(self) -> float:
        return self.sweep_interval_s or min(self.heartbeat_timeout_s / 4, 5.0)
