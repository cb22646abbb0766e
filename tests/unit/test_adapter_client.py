"""pull_adapter without sockets: a garbled or unverifiable stream leaves nothing behind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from swarm import adapter_client
from swarm.adapter import AdapterInfo, AdapterVerificationError, write_adapter
from swarm.adapter_client import AdapterDownloadError, pull_adapter
from swarm.keys import generate_signing_key
from swarm.proto import coordinator_pb2 as pb
from tests.unit.finalize_helpers import LORA, span_state

pytestmark = pytest.mark.timeout(30)


def chunks(directory: Path, version: str = "v1") -> list[pb.AdapterChunk]:
    out = []
    for path in sorted(directory.iterdir()):
        data = path.read_bytes()
        out.append(pb.AdapterChunk(file_name=path.name, offset=0, data=data, file_size=len(data), version=version))
    return out


@pytest.fixture
def published(tmp_path: Path) -> tuple[Path, Any]:
    key = generate_signing_key(tmp_path / "key")
    info = AdapterInfo(version="v1", round_id="r1", base_model="/m", base_fingerprint="sha256:x")
    write_adapter(tmp_path / "v1", {**span_state(0), **span_state(1)}, LORA, info, key)
    return tmp_path / "v1", key


def fake_stub(stream: list[pb.AdapterChunk]) -> Any:
    class Stub:
        def __init__(self, channel: object) -> None:
            pass

        def DownloadAdapter(self, request: pb.DownloadAdapterRequest, timeout: float) -> Iterator[pb.AdapterChunk]:
            return iter(stream)

    return Stub


def test_pull_keeps_a_verified_adapter(published: tuple[Path, Any], tmp_path: Path, monkeypatch: Any) -> None:
    directory, key = published
    monkeypatch.setattr(adapter_client.pb_grpc, "CoordinatorStub", fake_stub(chunks(directory)))
    manifest = pull_adapter(object(), "v1", tmp_path / "out", key.public_key())  # type: ignore[arg-type]
    assert manifest.version == "v1" and sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        p.name for p in directory.iterdir()
    )


@pytest.mark.parametrize(
    ("tamper", "error", "message"),
    [(lambda c: c[:-1], AdapterDownloadError, "ended without"),
     (lambda c: [*c[:1], pb.AdapterChunk(file_name="../evil", data=b"x", version="v1")], AdapterDownloadError,
      "unexpected file"),
     (lambda c: [pb.AdapterChunk(file_name=c[0].file_name, offset=5, data=b"x", version="v1")], AdapterDownloadError,
      "offset 5"),
     (lambda c: [pb.AdapterChunk(file_name=x.file_name, data=x.data, file_size=x.file_size + 1, version="v1")
                 for x in c], AdapterDownloadError, "received"),
     (lambda c: [pb.AdapterChunk(file_name=x.file_name, data=x.data, file_size=x.file_size, version="v9")
                 for x in c], AdapterDownloadError, "instead of 'v1'"),
     (lambda c: [pb.AdapterChunk(file_name=x.file_name, data=x.data[:-1] + b"!" if x.file_name.endswith(
         ".safetensors") else x.data, file_size=x.file_size, version="v1") for x in c], AdapterVerificationError,
      "weights sha256 mismatch")],
)  # fmt: skip
def test_garbled_downloads_leave_nothing(published: tuple[Path, Any], tmp_path: Path, monkeypatch: Any,
                                         tamper: Any, error: type, message: str) -> None:  # fmt: skip
    directory, key = published
    monkeypatch.setattr(adapter_client.pb_grpc, "CoordinatorStub", fake_stub(tamper(chunks(directory))))
    with pytest.raises(error, match=message):
        pull_adapter(object(), "v1", tmp_path / "out", key.public_key())  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key", "v1"]


def test_pull_refuses_a_non_empty_destination(published: tuple[Path, Any], tmp_path: Path) -> None:
    directory, key = published
    with pytest.raises(FileExistsError, match="already exists"):
        pull_adapter(object(), "v1", directory, key.public_key())  # type: ignore[arg-type]
