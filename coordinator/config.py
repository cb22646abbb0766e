"""The coordinator's one config object (pydantic v2, validated at construction)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

import swarm
from swarm.config import RoundSpec


class CoordinatorConfig(BaseModel):
    """Everything a coordinator process needs; ``serve(config)`` takes nothing else."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="Interface for gRPC and /metrics (0.0.0.0 = every interface).")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = pick a free port; the bound one is printed).")
    metrics_port: int | None = Field(
        9400,
        ge=0,
        le=65535,
        description="HTTP port of /metrics, /health and the status page (0 = pick a free port, -1 = off).",
    )
    workdir: Path = Field(
        Path("swarm-work"), description="Working directory; state goes to WORKDIR/coordinator/state.sqlite3."
    )
    store: Literal["sqlite", "memory"] = Field(
        "sqlite", description="sqlite: WORKDIR/coordinator/state.sqlite3; memory: lost on exit (tests)."
    )
    round_spec: RoundSpec | None = Field(
        None, description="RoundSpec JSON file: the round to open when none is open (none = open nothing)."
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
    rounds: int = Field(
        1, ge=0, description="Rounds to run from round_spec: each next one starts from the last adapter (0 = no limit)."
    )
    finalize_timeout_s: float = Field(
        600.0, gt=0, description="Longest wait for span uploads and final evals once a round is finalizing."
    )
    finalize_poll_s: float = Field(1.0, gt=0, description="How often the finalizer checks a finalizing round.")
    replica_atol: float = Field(
        1e-6, ge=0, description="Largest |difference| between replicas' uploads of a span that still agree."
    )
    signing_key: Path | None = Field(
        None, description="Ed25519 key that signs adapters (None = WORKDIR/coordinator/signing_key, made if missing)."
    )
    dht: bool = Field(True, description="Run a hivemind DHT node and publish the signed roster in it.")
    dht_host_maddrs: tuple[str, ...] = Field(
        (), description="Multiaddrs the DHT node listens on (empty = /ip4/<host>/tcp/0)."
    )
    dht_announce_maddrs: tuple[str, ...] = Field(
        (), description="Multiaddrs announced to peers (empty = the bound ones)."
    )
    dht_initial_peers: tuple[str, ...] = Field((), description="Multiaddrs of DHT nodes to join (empty = a new DHT).")
    dht_relay: bool = Field(
        True,
        description="Offer the DHT node as the circuit relay of peers behind NAT (run the coordinator on a public "
        "address). Relayed traffic crosses this host's link twice.",
    )
    roster_interval_s: float = Field(5.0, gt=0, description="Seconds between roster publications in the DHT.")
    insecure: bool = Field(
        False, description="Serve gRPC in plaintext (local demos and tests only: credentials then travel in clear)."
    )
    tls_cert: Path | None = Field(
        None, description="PEM certificate of the gRPC port (None = WORKDIR/coordinator/tls_cert.pem, made if missing)."
    )
    tls_key: Path | None = Field(
        None, description="PEM private key of tls_cert (None = WORKDIR/coordinator/tls_key.pem, made with the cert)."
    )
    tls_hostnames: tuple[str, ...] = Field(
        (), description="Names put in a generated certificate besides localhost, 127.0.0.1 and host."
    )
    public_dir: Path | None = Field(
        None, description="Directory to copy what peers need into (public_key.pem, tls_cert.pem); never the keys."
    )
    challenge_ttl_s: float = Field(60.0, gt=0, description="Seconds a Join challenge stays valid (single use).")
    max_samples_per_s: float = Field(
        2000.0, gt=0, description="Most samples per second one member's heartbeats may add (the excess waits)."
    )
    evaluator_ids: tuple[str, ...] = Field(
        (),
        description="Peer ids of evaluators the operator runs (swarm evaluator); when set, they alone gate "
        "publication (else a quorum of members does).",
    )
    eval_quorum: int = Field(
        3, ge=1, description="Evaluators the coordinator picks among members that reported a starting eval."
    )
    max_small_message_kb: int = Field(
        64, ge=1, description="Largest request of every call but UploadSpanState, in KiB (bigger: RESOURCE_EXHAUSTED)."
    )
    max_concurrent_rpcs: int = Field(64, ge=1, description="RPCs served at once; more get RESOURCE_EXHAUSTED.")
    rate_limit_per_s: float = Field(
        20.0, ge=0, description="Calls per second per identity (peer id, or address before Join); 0 = no limit."
    )
    rate_limit_burst: float = Field(60.0, ge=1, description="Calls one identity may make in a burst.")
    max_eval_reports: int = Field(50, ge=1, description="Eval reports kept per member and round (older dropped).")
    keep_rounds: int = Field(
        2, ge=1, description="Ended rounds whose uploaded span states are kept on disk (older ones are deleted)."
    )
    http_threads: int = Field(4, ge=1, description="Worker threads of the status / metrics HTTP server.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Python logging level.")
    http_timeout_s: float = Field(10.0, gt=0, description="Seconds an idle or slow HTTP connection is kept.")

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
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both, or neither to generate a pair")
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
    def adapters_dir(self) -> Path:
        """Published adapters: ``adapters_dir/<version>/``."""
        return self.workdir / "adapters"

    @property
    def signing_key_path(self) -> Path:
        return self.signing_key or self.state_dir / "signing_key"

    @property
    def tls_cert_path(self) -> Path:
        """PEM certificate peers pin (``--coordinator-cert``)."""
        return self.tls_cert or self.state_dir / "tls_cert.pem"

    @property
    def tls_key_path(self) -> Path:
        return self.tls_key or self.state_dir / "tls_key.pem"

    @property
    def public_key_path(self) -> Path:
        """The public half of the signing key, written at start for operators to hand to peers."""
        return self.state_dir / "public_key.pem"

    @property
    def effective_dht_host_maddrs(self) -> tuple[str, ...]:
        if self.dht_host_maddrs:
            return self.dht_host_maddrs
        host = "127.0.0.1" if self.host == "localhost" else self.host
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:  # a host name: listen everywhere
            return ("/ip4/0.0.0.0/tcp/0",)
        return (f"/ip{ip.version}/{host}/tcp/0",)

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * (1 << 20))

    @property
    def effective_sweep_interval_s(self) -> float:
        return self.sweep_interval_s or min(self.heartbeat_timeout_s / 4, 5.0)
