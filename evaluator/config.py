"""Configuration of ``swarm evaluator`` (pydantic v2, importable without torch)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EvaluatorConfig(BaseModel):
    """Everything an evaluator needs; its peer id (from ``identity_path``) goes to ``--evaluator-id``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    coordinator: str = Field(..., description="Coordinator gRPC address HOST:PORT.")
    coordinator_public_key: str = Field(..., description="The coordinator's Ed25519 public key (verifies parents).")
    coordinator_cert: str = Field("", description="The coordinator's TLS certificate to pin ('' = plaintext).")
    identity_path: str = Field(..., description="libp2p key file of this evaluator (made if missing).")
    eval_data: str = Field("", description="Held-out data file (JSONL/txt/parquet); '' = the round spec's eval data.")
    max_sequences: int = Field(256, ge=1, description="Held-out sequences evaluated (the first N).")
    batch_size: int = Field(16, ge=1, description="Sequences per forward pass.")
    poll_s: float = Field(1.0, gt=0, description="Seconds between checks for a candidate to evaluate.")
    device: str = Field("cpu", description="torch device for the model.")
    work_dir: str = Field("", description="Where parents and candidates are kept ('' = a temporary directory).")
