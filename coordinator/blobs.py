"""Files on disk: uploaded span states (written atomically) and adapter directories (read in chunks)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from swarm.config import SpanRange


def span_state_relpath(round_id: str, span: SpanRange, peer_id: str, epoch: int) -> str:
    """Where an upload lives, relative to the blob dir (ids are already restricted to safe characters)."""
    return f"{round_id}/span{span.start}-{span.end}/{peer_id}.epoch{epoch}.safetensors"


def write_atomic(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` via a synced temporary file and a rename; returns its sha256.

    A crash leaves either the old file or the new one, never a torn file under ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Chunk:
    file_name: str
    offset: int
    data: bytes
    file_size: int


def adapter_files(directory: Path) -> list[Path]:
    """The regular files of an adapter directory, by name (hidden files and subfolders skipped)."""
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))


def read_chunks(files: list[Path], chunk_bytes: int) -> Iterator[Chunk]:
    """Every file in order, ``chunk_bytes`` at a time; an empty file yields one empty chunk."""
    for path in files:
        size = path.stat().st_size
        with path.open("rb") as f:
            offset = 0
            while True:
                data = f.read(chunk_bytes)
                if data or offset == 0:
                    yield Chunk(path.name, offset, data, size)
                if len(data) < chunk_bytes:
                    break
                offset += len(data)
