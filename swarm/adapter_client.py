"""Fetching published adapters from a coordinator: list the registry, download and verify one version.

Peers and the ``swarm adapters list|pull`` commands use these. :func:`pull_adapter` streams
``DownloadAdapter`` into a hidden directory next to the destination, verifies the signature and hashes
with the coordinator's public key, and only then renames it into place; on any failure the partial
download is deleted and nothing appears at the destination.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from swarm.adapter_manifest import ADAPTER_FILES, Manifest
from swarm.proto import coordinator_pb2 as pb
from swarm.proto import coordinator_pb2_grpc as pb_grpc

__all__ = ["AdapterDownloadError", "list_adapters", "pull_adapter"]


class AdapterDownloadError(RuntimeError):
    """The coordinator sent something other than a complete adapter directory."""


def list_adapters(channel: grpc.Channel, timeout: float = 30.0) -> list[pb.AdapterEntry]:
    """The coordinator's adapter registry, oldest first."""
    return list(pb_grpc.CoordinatorStub(channel).ListAdapters(pb.ListAdaptersRequest(), timeout=timeout).adapters)


def _receive(chunks: object, folder: Path, version: str) -> str:
    """Write the streamed files into ``folder``; return the version the coordinator sent."""
    sent_version = ""
    sizes: dict[str, int] = {}
    written: dict[str, int] = {}
    for chunk in chunks:  # type: ignore[attr-defined]
        name = chunk.file_name
        if name not in ADAPTER_FILES:
            raise AdapterDownloadError(f"coordinator sent an unexpected file {name[:64]!r}; expected {ADAPTER_FILES}")
        if version and chunk.version != version:
            raise AdapterDownloadError(f"coordinator sent version {chunk.version!r} instead of {version!r}")
        sent_version = chunk.version
        if chunk.offset != written.get(name, 0):
            raise AdapterDownloadError(f"{name}: chunk at offset {chunk.offset}, expected {written.get(name, 0)}")
        sizes[name] = chunk.file_size
        with (folder / name).open("ab") as f:
            f.write(chunk.data)
        written[name] = written.get(name, 0) + len(chunk.data)
    missing = [n for n in ADAPTER_FILES if n not in written]
    if missing:
        raise AdapterDownloadError(f"download ended without {', '.join(missing)}")
    for name, size in sizes.items():
        if written[name] != size:
            raise AdapterDownloadError(f"{name}: received {written[name]} of {size} bytes")
    return sent_version


def pull_adapter(
    channel: grpc.Channel, version: str, out: str | Path, public_key: Ed25519PublicKey, timeout: float = 300.0
) -> Manifest:
    """Download adapter ``version`` ('' = the latest) to directory ``out`` and return its verified manifest.

    Raises ``FileExistsError`` if ``out`` exists and is not empty, ``grpc.RpcError`` for an RPC failure
    (NOT_FOUND for an unknown version), :class:`AdapterDownloadError` for a garbled stream and
    :class:`swarm.adapter.AdapterVerificationError` when the signature or a hash does not verify.
    """
    from swarm.adapter import verify_adapter

    target = Path(out)
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise FileExistsError(f"{target} already exists; pick a new --out directory or remove it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.download-", dir=target.parent))
    try:
        stream = pb_grpc.CoordinatorStub(channel).DownloadAdapter(
            pb.DownloadAdapterRequest(version=version), timeout=timeout
        )
        sent = _receive(stream, tmp, version)
        manifest = verify_adapter(tmp, public_key)
        if manifest.version != sent:
            raise AdapterDownloadError(
                f"the manifest names version {manifest.version!r}, the coordinator sent {sent!r}"
            )
        os.chmod(tmp, 0o755)
        if target.is_dir():
            target.rmdir()  # empty (checked above); rename needs it gone
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
