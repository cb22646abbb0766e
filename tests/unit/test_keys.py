"""Signing keys: file modes, refusal of insecure or overwritten keys, PEM round trips, signatures."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from swarm.keys import (
    InsecureKeyFileError,
    generate_signing_key,
    load_or_create_signing_key,
    load_public_key,
    load_signing_key,
    public_key_fingerprint,
    sign_hex,
    verify_hex,
    write_public_key,
)

pytestmark = pytest.mark.timeout(30)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generated_key_is_0600_and_loads(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "coordinator.pem"
    key = generate_signing_key(path)
    assert _mode(path) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = load_signing_key(path)
    assert public_key_fingerprint(loaded.public_key()) == public_key_fingerprint(key.public_key())


def test_key_is_0600_even_with_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "k.pem"
        generate_signing_key(path)
        generate_signing_key(path, overwrite=True)
    finally:
        os.umask(old)
    assert _mode(path) == 0o600


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    first = generate_signing_key(path)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        generate_signing_key(path)
    assert public_key_fingerprint(load_signing_key(path).public_key()) == public_key_fingerprint(first.public_key())
    second = generate_signing_key(path, overwrite=True)
    assert _mode(path) == 0o600
    assert public_key_fingerprint(load_signing_key(path).public_key()) == public_key_fingerprint(second.public_key())
    assert [p.name for p in tmp_path.iterdir()] == ["k.pem"]  # no temp file left behind


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_load_refuses_group_or_world_readable_key(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "k.pem"
    generate_signing_key(path)
    path.chmod(mode)
    with pytest.raises(InsecureKeyFileError, match="chmod 600"):
        load_signing_key(path)


def test_load_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_signing_key(tmp_path / "missing.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    junk.chmod(0o600)
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        load_signing_key(junk)
    with pytest.raises(ValueError, match="not a PEM public key"):
        load_public_key(junk)


def test_load_or_create(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    created = load_or_create_signing_key(path)
    again = load_or_create_signing_key(path)
    assert public_key_fingerprint(created.public_key()) == public_key_fingerprint(again.public_key())


def test_public_key_round_trip_and_fingerprint(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    pub = write_public_key(key, tmp_path / "k.pub")
    loaded = load_public_key(tmp_path / "k.pub")
    assert (tmp_path / "k.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    fp = public_key_fingerprint(loaded)
    assert fp == public_key_fingerprint(pub)
    assert len(fp) == 64 and all(c in "0123456789abcdef" for c in fp)
    assert fp != public_key_fingerprint(Ed25519PrivateKey.generate().public_key())


def test_sign_and_verify_hex() -> None:
    key = Ed25519PrivateKey.generate()
    sig = sign_hex(key, b"manifest")
    assert len(sig) == 128
    assert verify_hex(key.public_key(), b"manifest", sig)
    assert verify_hex(key.public_key(), b"manifest", sig + "\n")
    assert not verify_hex(key.public_key(), b"manifesT", sig)
    assert not verify_hex(Ed25519PrivateKey.generate().public_key(), b"manifest", sig)
    with pytest.raises(ValueError, match="hex"):
        verify_hex(key.public_key(), b"manifest", "zz" * 64)
    with pytest.raises(ValueError, match="64 bytes"):
        verify_hex(key.public_key(), b"manifest", sig[:-2])
