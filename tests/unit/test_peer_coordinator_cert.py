"""A peer pins the coordinator's certificate; plaintext only when told the coordinator runs --insecure."""

from __future__ import annotations

from pathlib import Path

import pytest

from peer.config import PeerConfig

pytestmark = pytest.mark.timeout(30)


def test_the_certificate_beside_the_public_key_is_pinned(tmp_path: Path) -> None:
    public = tmp_path / "public_key.pem"
    config = PeerConfig(coordinator="c:1", coordinator_public_key=str(public))
    with pytest.raises(ValueError, match="--coordinator-cert"):
        _ = config.coordinator_cert_path  # no certificate anywhere: refuse rather than talk plaintext
    (tmp_path / "tls_cert.pem").write_text("pem")
    assert config.coordinator_cert_path == str(tmp_path / "tls_cert.pem")
    explicit = config.model_copy(update={"coordinator_cert": "/elsewhere/cert.pem"})
    assert explicit.coordinator_cert_path == "/elsewhere/cert.pem"
    assert config.model_copy(update={"coordinator_insecure": True}).coordinator_cert_path == ""
