"""Ed25519 signing keys: create, store (PEM, mode 0600), load, fingerprint, sign and verify.

The coordinator signs every published adapter manifest with its private key; peers verify with the
public key. Private keys are PEM PKCS8 (unencrypted) files that only their owner may read: they are
created with mode 0600 from the first byte and :func:`load_signing_key` refuses a key file that group
or others can access. Public keys are PEM SubjectPublicKeyInfo files.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "InsecureKeyFileError",
    "generate_signing_key",
    "load_or_create_signing_key",
    "load_public_key",
    "load_signing_key",
    "public_key_fingerprint",
    "sign_hex",
    "verify_hex",
    "write_public_key",
]


class InsecureKeyFileError(PermissionError):
    """A private key file is accessible by group or others."""


def _private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _write_private_file(path: Path, data: bytes, overwrite: bool) -> None:
    """Write ``data`` to ``path`` with mode 0600; the file is never readable by others, even briefly."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    if not overwrite:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise FileExistsError(
                f"signing key {path} already exists; refusing to overwrite it (pass overwrite=True / --force)"
            ) from None
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return
    # Overwrite: write a 0600 temp file next to the target, then atomically replace it.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def generate_signing_key(path: str | Path, *, overwrite: bool = False) -> Ed25519PrivateKey:
    """Create a new Ed25519 private key and write it to ``path`` (PEM PKCS8, unencrypted, mode 0600).

    Raises ``FileExistsError`` if ``path`` exists and ``overwrite`` is false.
    """
    key = Ed25519PrivateKey.generate()
    _write_private_file(Path(path), _private_pem(key), overwrite)
    return key


def load_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key from a PEM file that only its owner can access.

    Raises ``FileNotFoundError`` if it is missing, :class:`InsecureKeyFileError` if group or others have
    any permission on it (fix with ``chmod 600``), ``ValueError`` if it is not an Ed25519 PEM key.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"signing key {p} does not exist (create one with `swarm adapters keygen {p}`)")
    mode = p.stat().st_mode & 0o777
    if os.name == "posix" and mode & 0o077:
        raise InsecureKeyFileError(
            f"signing key {p} has mode {mode:04o} and is accessible by group/others; "
            f"run `chmod 600 {p}` and make sure the key was not leaked"
        )
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"signing key {p} is not an unencrypted PEM private key: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"signing key {p} is a {type(key).__name__}, expected an Ed25519 private key")
    return key


def load_or_create_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """Load the signing key at ``path``, or generate one there (mode 0600) if the file does not exist."""
    p = Path(path)
    if p.exists():
        return load_signing_key(p)
    try:
        return generate_signing_key(p)
    except FileExistsError:  # another process created it between the check and the create
        return load_signing_key(p)


def write_public_key(key: Ed25519PrivateKey | Ed25519PublicKey, path: str | Path) -> Ed25519PublicKey:
    """Write the public half of ``key`` to ``path`` as PEM SubjectPublicKeyInfo and return it."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    pem = pub.public_bytes(encoding=serialization.Encoding.PEM, format=serialization.PublicFormat.SubjectPublicKeyInfo)
    Path(path).write_bytes(pem)
    return pub


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Load an Ed25519 public key from a PEM SubjectPublicKeyInfo file.

    Raises ``FileNotFoundError`` if missing and ``ValueError`` if it is not an Ed25519 public key.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"public key {p} does not exist")
    try:
        pub = serialization.load_pem_public_key(p.read_bytes())
    except (ValueError, TypeError) as e:
        raise ValueError(f"public key {p} is not a PEM public key: {e}") from e
    if not isinstance(pub, Ed25519PublicKey):
        raise ValueError(f"public key {p} is a {type(pub).__name__}, expected an Ed25519 public key")
    return pub


def public_key_fingerprint(pub: Ed25519PublicKey) -> str:
    """Hex sha256 of the 32 raw public key bytes (64 lowercase hex characters)."""
    raw = pub.public_bytes(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def sign_hex(key: Ed25519PrivateKey, data: bytes) -> str:
    """Ed25519 signature of ``data`` as 128 lowercase hex characters."""
    return key.sign(data).hex()


def verify_hex(pub: Ed25519PublicKey, data: bytes, signature_hex: str) -> bool:
    """True if ``signature_hex`` (as written by :func:`sign_hex`) is a valid signature of ``data``.

    Raises ``ValueError`` if ``signature_hex`` is not 128 hex characters.
    """
    text = signature_hex.strip()
    try:
        sig = bytes.fromhex(text)
    except ValueError:
        raise ValueError("signature is not hex-encoded") from None
    if len(sig) != 64:
        raise ValueError(f"signature must be 64 bytes (128 hex characters), got {len(sig)} bytes")
    try:
        pub.verify(sig, data)
    except InvalidSignature:
        return False
    return True


#: longest ``spec_nonce`` a coordinator signs over (JoinRequest / GetRoundSpecRequest)
MAX_SPEC_NONCE = 64


def spec_payload(spec_json: str, nonce: bytes) -> bytes:
    """What the coordinator signs when it hands out a round spec: the spec bound to the asker's fresh nonce.

    The nonce makes a signed spec single-use: an older response replayed to a peer (an older round, an older
    parent adapter, other data) carries a signature over another nonce and does not verify.
    """
    if len(nonce) > MAX_SPEC_NONCE:
        raise ValueError(f"spec_nonce has {len(nonce)} bytes; at most {MAX_SPEC_NONCE}")
    return b"loraswarm-round-spec-v1\0" + len(nonce).to_bytes(1, "big") + nonce + spec_json.encode()


def verified_spec_json(pub: Ed25519PublicKey | None, spec_json: str, signature_hex: str, nonce: bytes) -> str:
    """``spec_json`` when ``signature_hex`` signs it for ``nonce`` with ``pub`` (no check without a key).

    Raises ``ValueError`` naming the problem otherwise.
    """
    if pub is None:
        return spec_json
    try:
        ok = verify_hex(pub, spec_payload(spec_json, nonce), signature_hex)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            "the round spec does not carry the coordinator's signature over this request's nonce (forged, or an "
            "older answer replayed): refusing it"
        )
    return spec_json
