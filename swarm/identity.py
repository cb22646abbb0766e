"""A peer's libp2p identity: load its key file, sign with it, and check a signature against a peer id.

A hivemind peer id is the multihash of the libp2p ``PublicKey`` protobuf of the peer's key
(``P2P.generate_identity`` writes an RSA ``PrivateKey`` protobuf; ``PeerID.from_identity`` derives
the id). Whoever can sign with that key owns the id: the coordinator's ``Join`` asks for such a
signature over a fresh coordinator challenge (:func:`join_payload`), so a member is its key.

RSA keys sign with PSS/SHA-256 (as ``hivemind.utils.crypto.RSAPrivateKey`` does), Ed25519 keys
(libp2p key type 1) with plain Ed25519. The protobuf (two fields) is read and written by hand so
this module needs neither torch nor hivemind.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

RSA, ED25519 = 0, 1
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
_MAX_KEY_BYTES = 4096  # a 4096-bit RSA public key in DER is ~550 bytes

__all__ = [
    "IdentityError",
    "PeerIdentity",
    "join_payload",
    "load_identity",
    "load_or_create_identity",
    "peer_id_of",
    "verify_peer_signature",
]


class IdentityError(ValueError):
    """A key, public key or signature that does not hold; the message says which."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos
    raise IdentityError("truncated varint in a libp2p key protobuf")


def encode_key(key_type: int, data: bytes) -> bytes:
    """libp2p ``PublicKey`` / ``PrivateKey`` protobuf (proto2, both fields required)."""
    return b"\x08" + _varint(key_type) + b"\x12" + _varint(len(data)) + data


def decode_key(blob: bytes) -> tuple[int, bytes]:
    """``(key_type, data)`` of a libp2p key protobuf; :class:`IdentityError` if it is not one."""
    if len(blob) > _MAX_KEY_BYTES * 4:
        raise IdentityError(f"a libp2p key protobuf of {len(blob)} bytes is too large")
    key_type, data, pos = None, None, 0
    while pos < len(blob):
        tag, pos = _read_varint(blob, pos)
        if tag == 0x08:
            key_type, pos = _read_varint(blob, pos)
        elif tag == 0x12:
            n, pos = _read_varint(blob, pos)
            if pos + n > len(blob):
                raise IdentityError("truncated key data in a libp2p key protobuf")
            data, pos = blob[pos : pos + n], pos + n
        else:
            raise IdentityError(f"unexpected field tag {tag} in a libp2p key protobuf")
    if key_type is None or data is None:
        raise IdentityError("a libp2p key protobuf needs key_type and data")
    return key_type, data


def peer_id_of(public_key_pb: bytes) -> str:
    """The base58 libp2p peer id of a ``PublicKey`` protobuf (identity multihash up to 42 bytes, else sha2-256)."""
    if len(public_key_pb) <= 42:
        digest = b"\x00" + _varint(len(public_key_pb)) + public_key_pb
    else:
        digest = b"\x12\x20" + hashlib.sha256(public_key_pb).digest()
    return base58.b58encode(digest).decode()


def verify_peer_signature(peer_id: str, public_key_pb: bytes, payload: bytes, signature: bytes) -> None:
    """Raise :class:`IdentityError` unless ``public_key_pb`` derives ``peer_id`` and signed ``payload``."""
    if not public_key_pb:
        raise IdentityError("public_key is missing: send the libp2p public key of your identity")
    if len(public_key_pb) > _MAX_KEY_BYTES:
        raise IdentityError(f"public_key of {len(public_key_pb)} bytes is too large")
    if peer_id_of(public_key_pb) != peer_id:
        raise IdentityError(f"public_key does not belong to peer id {peer_id[:64]!r} (it derives another id)")
    key_type, data = decode_key(public_key_pb)
    try:
        if key_type == RSA:
            key = serialization.load_der_public_key(data)
            if not isinstance(key, rsa.RSAPublicKey) or key.key_size < 2048:
                raise IdentityError("an RSA identity key must be at least 2048 bits")
            key.verify(signature, payload, _PSS, hashes.SHA256())
        elif key_type == ED25519:
            Ed25519PublicKey.from_public_bytes(data).verify(signature, payload)
        else:
            raise IdentityError(f"libp2p key type {key_type} is not supported (use RSA or Ed25519)")
    except InvalidSignature:
        raise IdentityError(f"the signature was not made by peer {peer_id[:64]}'s key") from None
    except ValueError as e:
        if isinstance(e, IdentityError):
            raise
        raise IdentityError(f"public_key cannot be read: {e}") from None


@dataclass(frozen=True)
class PeerIdentity:
    """A loaded libp2p private key: its peer id, its public key protobuf, and :meth:`sign`."""

    private_key: rsa.RSAPrivateKey | Ed25519PrivateKey
    public_key_pb: bytes

    @property
    def peer_id(self) -> str:
        return peer_id_of(self.public_key_pb)

    def sign(self, payload: bytes) -> bytes:
        if isinstance(self.private_key, Ed25519PrivateKey):
            return self.private_key.sign(payload)
        return self.private_key.sign(payload, _PSS, hashes.SHA256())

    @classmethod
    def from_private_pb(cls, blob: bytes) -> PeerIdentity:
        key_type, data = decode_key(blob)
        if key_type == RSA:
            key = serialization.load_der_private_key(data, password=None)
            if not isinstance(key, rsa.RSAPrivateKey):
                raise IdentityError("the identity file's RSA key data is not an RSA private key")
            der = key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            return cls(key, encode_key(RSA, der))
        if key_type == ED25519:  # libp2p: 32-byte seed followed by the 32-byte public key
            ed = Ed25519PrivateKey.from_private_bytes(data[:32])
            raw = ed.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            return cls(ed, encode_key(ED25519, raw))
        raise IdentityError(f"libp2p key type {key_type} is not supported (use RSA or Ed25519)")

    @classmethod
    def generate_ed25519(cls, seed: bytes | None = None) -> PeerIdentity:
        """A fresh (or, from a 32-byte ``seed``, deterministic) Ed25519 identity."""
        ed = Ed25519PrivateKey.from_private_bytes(seed) if seed else Ed25519PrivateKey.generate()
        raw = ed.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(ed, encode_key(ED25519, raw))

    def private_pb(self) -> bytes:
        """The libp2p ``PrivateKey`` protobuf (what an identity file holds)."""
        if isinstance(self.private_key, Ed25519PrivateKey):
            seed = self.private_key.private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
            )
            return encode_key(ED25519, seed + decode_key(self.public_key_pb)[1])
        der = self.private_key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
        return encode_key(RSA, der)


def load_identity(path: str | Path) -> PeerIdentity:
    """Read a libp2p identity file (``P2P.generate_identity`` writes one)."""
    return PeerIdentity.from_private_pb(Path(path).read_bytes())


def load_or_create_identity(path: str | Path) -> PeerIdentity:
    """:func:`load_identity`, after writing a new Ed25519 identity file (mode 0600) if there is none."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(PeerIdentity.generate_ed25519().private_pb())
    return load_identity(path)


def join_payload(peer_id: str, round_id: str, challenge: str, base_fingerprint: str, multiaddrs: list[str]) -> bytes:
    """The bytes a peer signs to Join: bound to the coordinator's single-use challenge and to the request."""
    fields = ["loraswarm-join-v1", peer_id, round_id, challenge, base_fingerprint, *multiaddrs]
    return "\n".join(f.replace("\n", " ") for f in fields).encode()


def dht_key_payload(round_id: str, subkey: bytes) -> bytes:
    """What a peer's libp2p key signs to own the DHT record key (``subkey``) it signs its round records with."""
    return b"loraswarm-dht-key-v1\n" + round_id.encode() + b"\n" + subkey


def dht_key_binding(identity: PeerIdentity, round_id: str, subkey: bytes) -> dict[str, bytes]:
    """The fields a peer adds to its DHT records (``identity_key``, ``binding``): proof that the peer id the record
    names is the one whose key signs it (hivemind signs records with a separate RSA key: the subkey's owner)."""
    return {"identity_key": identity.public_key_pb, "binding": identity.sign(dht_key_payload(round_id, subkey))}


@functools.lru_cache(maxsize=4096)
def bound_to_peer(peer_id: str, round_id: str, subkey: bytes, identity_key: bytes, binding: bytes) -> bool:
    """True if ``binding`` is ``peer_id``'s signature (its key is ``identity_key``) over its ownership of
    ``subkey`` in ``round_id`` (cached: records are re-read many times a second)."""
    try:
        verify_peer_signature(peer_id, identity_key, dht_key_payload(round_id, subkey), binding)
    except ValueError:  # IdentityError, or a key that does not parse
        return False
    return True
