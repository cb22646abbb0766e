"""Configuration of the peer daemon (pydantic v2, importable without torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from swarm.config import SpanRange
from swarm.quantize import Quantize


class PeerConfig(BaseModel):
    """Everything ``swarm peer`` needs; every CLI flag maps to one field."""

    model_config = ConfigDict(extra="forbid")

    round_spec: str = Field("", description="Round spec JSON file (used when no coordinator is given).")
    coordinator: str = Field("", description="Coordinator gRPC address HOST:PORT; the round spec comes from it.")
    coordinator_public_key: str = Field("", description="Coordinator's Ed25519 public key that signs adapters.")
    join_token: str = Field("", description="Token the coordinator may require to join (env SWARM_JOIN_TOKEN).")
    coordinator_cert: str = Field(
        "",
        description="The coordinator's TLS certificate (PEM) to pin; '' = tls_cert.pem beside coordinator_public_key "
        "when it exists.",
    )
    coordinator_insecure: bool = Field(
        False, description="Talk plaintext to a coordinator run with --insecure (local demos and tests only)."
    )
    span: SpanRange | None = Field(
        None,
        description="Blocks to host as START:END (default: from --span-index, the coordinator, or the least-served span).",
    )
    span_index: int = Field(-1, description="Index into the round's spans to host (-1 = choose automatically).")
    num_blocks: int = Field(0, description="Max blocks to host (0 = no limit on CPU, what fits in free GPU memory).")
    initial_peers: tuple[str, ...] = Field((), description="Multiaddrs of DHT peers to join (empty = start a DHT).")
    host_maddrs: tuple[str, ...] = Field(("/ip4/0.0.0.0/tcp/0",), description="Multiaddrs libp2p listens on.")
    announce_maddrs: tuple[str, ...] = Field((), description="Multiaddrs announced to others (e.g. public IP).")
    identity_path: str = Field("", description="libp2p private key file; created if missing; keeps the peer id.")
    use_relay: bool = Field(
        True, description="Reach peers behind NAT through relays, and be reached through one (--no-relay: direct only)."
    )
    use_auto_relay: bool = Field(
        False, description="Be reached through a relay from the start, without asking (same as --reachability private)."
    )
    reachability: Literal["auto", "public", "private"] = Field(
        "auto",
        description="How others reach this peer. auto: with --coordinator, it dials this machine back before libp2p "
        "starts (about a second): reached = public (direct connections), not reached = "
        "private (reserve a slot with a relay at once); without a coordinator, libp2p guesses (AutoNAT). "
        "public / private: skip the question.",
    )
    relays: tuple[str, ...] = Field(
        (),
        description="Relays to reserve a slot with when private (multiaddrs with /p2p/<id>; default: the relays the "
        "coordinator offers, its DHT node; without a coordinator, --initial-peers).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the span runs.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Span weights dtype; auto = float32 on CPU, bfloat16 on GPU."
    )
    quantize: Quantize = Field(
        "none",
        description="Keep the span's frozen base weights in 4 bits (nf4) or 8 bits (int8) with bitsandbytes; "
        "LoRA stays in --dtype (QLoRA). For GPUs too small for the span in --dtype.",
    )
    check: bool = Field(
        False, description="Run the startup self-check, print its table (or JSON with --json), exit 0 if all pass."
    )
    check_json: bool = Field(False, description="With --check: print the results as JSON (for tools).")
    trainer: bool | None = Field(None, description="Drive training batches (default: on when --data is given).")
    trainer_only: bool = Field(
        False,
        description="Host no span: only train, through the span servers of others (a GPU too small for any span, "
        "or a volunteer who brings data). Needs --data; not with --span, --span-index or --no-trainer.",
    )
    data_path: str = Field(
        "",
        description="Training text for the trainer: JSONL/txt/parquet file or directory (overrides the spec's data).",
    )
    eval_data_path: str = Field(
        "",
        description="Held-out text for the trainer's evaluations, in --data's formats ('' = held out from --data). "
        "With a coordinator the peer reads only the data files given here and in --data, never paths in the "
        "round spec.",
    )
    shard_index: int = Field(0, description="Which data shard this trainer reads (0-based).")
    num_shards: int = Field(1, description="How many shards the training data is cut into.")
    min_replicas: int = Field(1, description="Trainer waits until every span has this many announced servers.")
    max_steps: int = Field(0, description="Stop the trainer after this many micro-batches (0 = run until round end).")
    pipeline_depth: int = Field(
        0,
        description="Micro-batches the trainer keeps in flight within a step (0 = auto: 2 on a GPU or with "
        "--threads 1, else 1; on CPU, several torch threads per micro-batch and several micro-batches compete for "
        "cores).",
    )
    min_trainers: int = Field(1, description="Trainer waits until this many trainers announce a step record.")
    activation_memory_mb: int = Field(
        1024, description="Memory for forward activations kept for their backward (beyond it: recompute)."
    )
    request_timeout: float = Field(30.0, description="Seconds before a remote span call fails over.")
    spot_check_rate: float = Field(
        0.02,
        description="Share of remote forwards the trainer also sends to up to two other replicas of the span (same "
        "quantization) and compares; a replica outvoted by two others is reported and failed over (0 = off).",
    )
    announce_period: float = Field(5.0, description="Seconds between DHT announcements.")
    metrics_port: int = Field(-1, description="Port of /metrics and /health (-1 = off, 0 = ephemeral).")
    metrics_host: str = Field("127.0.0.1", description="Address the metrics server binds.")
    threads: int = Field(0, description="torch intra-op threads (0 = torch default).")
    events_file: str = Field(
        "", description="JSON-lines event file: ready (peer id, maddrs, metrics port), eval, step, epoch, stopped."
    )
    checkpoint_dir: str = Field("", description="Write the span's LoRA state here after every optimizer epoch.")
    eval_batches: int = Field(4, description="Held-out micro-batches the trainer evaluates at start and end.")
    seed: int = Field(0, description="Seed of the trainer's batch order.")

    @field_validator(
        "shard_index",
        "num_shards",
        "max_steps",
        "num_blocks",
        "min_replicas",
        "min_trainers",
        "pipeline_depth",
        "activation_memory_mb",
    )
    @classmethod
    def _non_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"must be >= 0, got {v}")
        return v

    @field_validator("spot_check_rate")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"must be in [0, 1], got {v}")
        return v

    @field_validator("request_timeout", "announce_period")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError(f"must be > 0, got {v}")
        return v

    @property
    def coordinator_cert_path(self) -> str:
        """The certificate to pin ('' = plaintext, only with ``coordinator_insecure``); ValueError if none."""
        if self.coordinator_insecure:
            return ""
        if self.coordinator_cert:
            return self.coordinator_cert
        beside = Path(self.coordinator_public_key).with_name("tls_cert.pem") if self.coordinator_public_key else None
        if beside is None or not beside.exists():
            raise ValueError(
                f"no TLS certificate for the coordinator: pass --coordinator-cert FILE (the coordinator's tls_cert.pem)"
                f"{f' or put it at {beside}' if beside else ''}; --coordinator-insecure only for a coordinator run "
                "with --insecure"
            )
        return str(beside)

    @model_validator(mode="after")
    def _relay_choices_agree(self) -> PeerConfig:
        if self.use_auto_relay and self.reachability == "public":
            raise ValueError("--use-auto-relay means --reachability private: drop one of them")
        if (self.use_auto_relay or self.reachability == "private") and not self.use_relay:
            raise ValueError("--reachability private (--use-auto-relay) is reached through a relay: drop --no-relay")
        for maddr in self.relays:
            if "/p2p/" not in maddr:
                raise ValueError(f"--relays {maddr}: a relay's multiaddr must end with /p2p/<peer id>")
        return self

    @property
    def reach(self) -> Literal["auto", "public", "private"]:
        """The reachability asked for (``--use-auto-relay`` is ``private``)."""
        return "private" if self.use_auto_relay else self.reachability

    @model_validator(mode="after")
    def _trainer_only_hosts_nothing(self) -> PeerConfig:
        if self.trainer_only and (self.span is not None or self.span_index >= 0):
            raise ValueError("--trainer-only hosts no span: drop --span / --span-index")
        if self.trainer_only and self.trainer is False:
            raise ValueError("--trainer-only with --no-trainer would do nothing: drop one of them")
        return self

    @property
    def is_trainer(self) -> bool:
        if self.trainer_only:
            return True
        return bool(self.data_path) if self.trainer is None else self.trainer
