"""Data handlers (span states, evals, adapters) and the metrics they feed, called as plain functions."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import generate_latest

from coordinator import handlers, handlers_data
from coordinator.config import CoordinatorConfig
from coordinator.context import CoordinatorContext
from coordinator.rounds import open_round
from coordinator.state import AdapterRecord
from coordinator.validation import HandlerError, check_safetensors
from swarm.config import BaseModelRef, EndCondition, RoundSpec, split_even
from swarm.proto import coordinator_pb2 as pb
from tests.identities import Peers, pid

pytestmark = pytest.mark.timeout(30)


def safetensors_bytes(tensors: dict[str, tuple[str, list[int]]], size: dict[str, int] | None = None) -> bytes:
    """A valid safetensors file of zeros (built by hand: the coordinator never imports torch)."""
    width = {"F32": 4, "BF16": 2, "F16": 2}
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = math.prod(shape) * width[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * offset


LORA = safetensors_bytes({"layers.0.q_proj.lora_A": ("F32", [8, 16]), "layers.0.q_proj.lora_B": ("F32", [16, 8])})


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


PEERS: dict[int, Peers] = {}  # id(ctx) -> its test peers


def beat(ctx: CoordinatorContext, peer: str, **progress: int) -> pb.HeartbeatResponse:
    req = pb.HeartbeatRequest(peer_id=pid(peer), round_id="r1", progress=pb.Progress(**progress),
                              credential=PEERS[id(ctx)].credential(peer))  # fmt: skip
    return handlers.heartbeat(ctx, req)


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[CoordinatorContext]:
    config = CoordinatorConfig(workdir=tmp_path, download_chunk_bytes=1024)
    c = CoordinatorContext.from_config(config, Clock())
    base = BaseModelRef(path="/m", num_layers=4)
    spec = RoundSpec(round_id="r1", base=base, spans=split_even(4, 2), end=EndCondition(target_samples=10**6))
    open_round(c.store, spec, c.clock())
    peers = PEERS[id(c)] = Peers(c, software_version="0.1.0")
    for peer in ("a", "b"):  # a serves span 0-2, b span 2-4
        assert peers.join(peer).accepted
        beat(c, peer, epoch=3)
    yield c
    c.store.close()


def upload(ctx: CoordinatorContext, **kw: object) -> pb.UploadSpanStateResponse:
    fields: dict = dict(peer_id=pid("a"), round_id="r1", span=pb.Span(start=0, end=2), epoch=3, safetensors=LORA,
                        samples=64, credential=PEERS[id(ctx)].credential("a"))  # fmt: skip
    fields.update(kw)
    return handlers_data.upload_span_state(ctx, pb.UploadSpanStateRequest(**fields))


def error(fn: object, *args: object, **kw: object) -> HandlerError:
    with pytest.raises(HandlerError) as info:
        fn(*args, **kw)  # type: ignore[operator]
    return info.value


def test_upload_span_state_is_stored(ctx: CoordinatorContext) -> None:
    r = upload(ctx)
    assert r.ok and r.size_bytes == len(LORA)
    (rec,) = ctx.store.list_span_states("r1")
    assert (rec.peer_id, rec.span_index, rec.epoch, rec.samples, rec.sha256) == (pid("a"), 0, 3, 64, r.sha256)
    assert (ctx.config.blob_dir / rec.path).read_bytes() == LORA
    assert upload(ctx).sha256 == r.sha256 and len(ctx.store.list_span_states("r1")) == 1  # a retry replaces


@pytest.mark.parametrize(
    ("kw", "field"),
    [({"peer_id": ""}, "peer_id"), ({"epoch": -1}, "epoch"), ({"samples": -3}, "samples"),
     ({"span": pb.Span(start=0, end=4)}, "span [0, 4)"), ({"safetensors": b""}, "safetensors"),
     ({"safetensors": b"\x10\0\0\0\0\0\0\0{not json}     "}, "safetensors header"),
     ({"safetensors": LORA[:-4]}, "safetensors"),
     ({"safetensors": LORA + b"\0\0"}, "safetensors has 2 trailing bytes")],
)  # fmt: skip
def test_upload_malformed_is_invalid_argument(ctx: CoordinatorContext, kw: dict, field: str) -> None:
    e = error(upload, ctx, **kw)
    assert e.code is grpc.StatusCode.INVALID_ARGUMENT and e.message.startswith(field), e.message
    assert ctx.store.list_span_states("r1") == []


def test_upload_preconditions(ctx: CoordinatorContext) -> None:
    e = error(upload, ctx, peer_id="stranger", credential="")
    assert e.code is grpc.StatusCode.FAILED_PRECONDITION and "Join before" in e.message
    assert error(upload, ctx, round_id="r2").code is grpc.StatusCode.NOT_FOUND
    ctx.store.set_round_state("r1", ctx.store.get_round("r1").state.FAILED, expected=ctx.store.get_round("r1").state)  # type: ignore[union-attr]
    e = error(upload, ctx)
    assert e.code is grpc.StatusCode.FAILED_PRECONDITION and "is failed" in e.message


def test_check_safetensors_rejects_bad_tables() -> None:
    bad = {"x": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}
    raw = json.dumps(bad).encode()
    with pytest.raises(HandlerError, match="unknown dtype 'F99'"):
        check_safetensors(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    overlap = safetensors_bytes({"a": ("F32", [2]), "b": ("F32", [2])}).replace(b"[8, 16]", b"[4, 12]")
    with pytest.raises(HandlerError, match="overlaps or leaves gaps"):
        check_safetensors(overlap)
    assert set(check_safetensors(LORA)) == {"layers.0.q_proj.lora_A", "layers.0.q_proj.lora_B"}


def test_report_eval_and_metric(ctx: CoordinatorContext) -> None:
    def report(**kw: object) -> pb.ReportEvalResponse:
        fields: dict = dict(peer_id=pid("a"), round_id="r1", epoch=2, eval_loss=2.0, eval_tokens=100,
                            credential=PEERS[id(ctx)].credential("a"))  # fmt: skip
        fields.update(kw)
        if fields["peer_id"] == "b":
            fields.update(peer_id=pid("b"), credential=PEERS[id(ctx)].credential("b"))
        return handlers_data.report_eval(ctx, pb.ReportEvalRequest(**fields))

    assert report().ok
    report(peer_id="b", eval_loss=1.0, eval_tokens=300)
    report(epoch=1, eval_loss=9.0)  # an older epoch does not count for the in-progress label
    report(adapter_version="v1", eval_loss=1.5)
    bad: list[tuple[dict[str, object], str]] = [
        ({"eval_loss": math.nan}, "eval_loss"), ({"eval_loss": -1.0}, "eval_loss"),
        ({"eval_tokens": 0}, "eval_tokens"), ({"adapter_version": "a/b"}, "adapter_version"),
    ]  # fmt: skip
    for kw, field in bad:
        e = error(report, **kw)
        assert e.code is grpc.StatusCode.INVALID_ARGUMENT and e.message.startswith(field)
    assert len(ctx.store.list_eval_reports("r1")) == 4
    sample = ctx.metrics.registry.get_sample_value
    assert sample("swarm_coordinator_eval_loss", {"version": "r1-training"}) == pytest.approx(1.25)
    assert sample("swarm_coordinator_eval_loss", {"version": "v1"}) == 1.5


def publish(ctx: CoordinatorContext, tmp_path: Path, version: str, files: dict[str, bytes]) -> Path:
    d = tmp_path / "adapters" / version
    d.mkdir(parents=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    ctx.store.add_adapter(AdapterRecord(version, ("v0",), "r1", str(d), "abc", 5.0, 2.0, 1.5))
    return d


def test_list_and_download_adapters(ctx: CoordinatorContext, tmp_path: Path) -> None:
    assert error(lambda: list(handlers_data.download_adapter(ctx, pb.DownloadAdapterRequest()))).code is (
        grpc.StatusCode.NOT_FOUND
    )
    files = {"adapter_config.json": b"{}", "adapter_model.safetensors": bytes(range(256)) * 10, "manifest.sig": b""}
    publish(ctx, tmp_path, "v1", files)
    (entry,) = handlers_data.list_adapters(ctx, pb.ListAdaptersRequest()).adapters
    assert (entry.version, list(entry.parents), entry.eval_loss_after, entry.sha256) == ("v1", ["v0"], 1.5, "abc")
    chunks = list(handlers_data.download_adapter(ctx, pb.DownloadAdapterRequest(version="v1")))
    assert all(len(c.data) <= 1024 and c.version == "v1" for c in chunks)
    got: dict[str, bytes] = {}
    for c in chunks:
        assert c.offset == len(got.get(c.file_name, b"")) and c.file_size == len(files[c.file_name])
        got[c.file_name] = got.get(c.file_name, b"") + c.data
    assert got == files
    assert [c.file_name for c in handlers_data.download_adapter(ctx, pb.DownloadAdapterRequest())][0] == (
        "adapter_config.json"
    )  # '' = latest
    e = error(handlers_data.download_adapter, ctx, pb.DownloadAdapterRequest(version="v7"))
    assert e.code is grpc.StatusCode.NOT_FOUND and "'v7'" in e.message
    ctx.store.add_adapter(AdapterRecord("gone", (), "r1", str(tmp_path / "nowhere"), "h", 6.0))
    assert error(handlers_data.download_adapter, ctx, pb.DownloadAdapterRequest(version="gone")).code is (
        grpc.StatusCode.DATA_LOSS
    )


def test_state_metrics_exposition(ctx: CoordinatorContext, tmp_path: Path) -> None:
    publish(ctx, tmp_path, "v1", {"adapter_config.json": b"{}"})
    ctx.clock.now += 1  # type: ignore[attr-defined]
    beat(ctx, "a", samples=12, epoch=3)
    text = generate_latest(ctx.metrics.registry).decode()
    for line in [
        'swarm_coordinator_rounds{state="training"} 1.0',
        'swarm_coordinator_members{span="0-2",state="live"} 1.0',
        'swarm_coordinator_span_live_replicas{span="2-4"} 1.0',
        "swarm_coordinator_spans_covered 2.0",
        'swarm_coordinator_round_samples{round="r1"} 12.0',
        'swarm_coordinator_round_target_samples{round="r1"} 1e+06',
        "swarm_coordinator_adapters_published_total 1.0",
        'swarm_coordinator_eval_loss{version="v1"} 1.5',
    ]:
        assert line in text
    assert all(n.startswith("swarm_coordinator_") for n in ctx.metrics.registry._names_to_collectors)
