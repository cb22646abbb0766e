"""The self-check's local checks (no sockets): each mistake gives one failure line naming it and what to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from peer.config import PeerConfig
from peer.selfcheck import (
    CheckResult,
    failures,
    local_checks,
    memory_check,
    raise_on_local_failures,
    render_json,
    render_table,
)
from swarm.checkpoint import fingerprint
from swarm.config import BaseModelRef, RoundSpec, SpanRange
from swarm.keys import write_public_key

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def base(tiny_checkpoint) -> Path:  # type: ignore[no-untyped-def]
    return tiny_checkpoint("llama", layers=4)  # type: ignore[no-any-return]


def spec_file(tmp_path: Path, base: Path, fp: str | None = None, path: str | None = None) -> Path:
    spec = RoundSpec(
        round_id="r-check",
        base=BaseModelRef(path=path or str(base), fingerprint=fingerprint(base) if fp is None else fp, num_layers=4),
        spans=(SpanRange(start=0, end=1), SpanRange(start=1, end=4)),
    )
    out = tmp_path / "spec.json"
    spec.save(out)
    return out


def only_failure(config: PeerConfig) -> CheckResult:
    results, _ = local_checks(config)
    bad = failures(results)
    assert len(bad) == 1, results
    return bad[0]


def test_no_round() -> None:
    bad = only_failure(PeerConfig())
    assert (bad.name, bad.detail) == ("round", "no round: pass --round-spec FILE or --coordinator HOST:PORT")


def test_coordinator_without_key() -> None:
    bad = only_failure(PeerConfig(coordinator="127.0.0.1:1"))
    assert "without --coordinator-public-key" in bad.detail


def test_missing_public_key_file() -> None:
    bad = only_failure(PeerConfig(coordinator="127.0.0.1:1", coordinator_public_key="/nonexistent.pem"))
    assert bad.line() == (
        "FAIL coordinator-key: --coordinator-public-key /nonexistent.pem does not exist -> "
        "pass the path of the PEM public key the coordinator's operator publishes"
    )
    with pytest.raises(ValueError, match=r"^--coordinator-public-key /nonexistent.pem does not exist \(pass"):
        raise_on_local_failures(PeerConfig(coordinator="127.0.0.1:1", coordinator_public_key="/nonexistent.pem"))


def test_public_key_file_that_is_not_a_key(tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_text("not a key")
    bad = only_failure(PeerConfig(coordinator="127.0.0.1:1", coordinator_public_key=str(tmp_path / "key.pem")))
    assert "is not a PEM public key" in bad.detail


def test_valid_public_key_and_tls_certificate(tmp_path: Path) -> None:
    write_public_key(Ed25519PrivateKey.generate(), tmp_path / "pub.pem")
    config = PeerConfig(coordinator="127.0.0.1:1", coordinator_public_key=str(tmp_path / "pub.pem"))
    bad = only_failure(config)
    assert bad.name == "coordinator-tls" and "no TLS certificate for the coordinator" in bad.detail
    results, _ = local_checks(config.model_copy(update={"coordinator_insecure": True}))
    assert [(r.name, r.status) for r in results] == [
        ("round", "ok"),
        ("coordinator-key", "ok"),
        ("coordinator-tls", "ok"),
    ]
    (tmp_path / "tls_cert.pem").write_text("a certificate")  # found beside the public key
    results, _ = local_checks(config)
    assert results[-1].detail == f"TLS, pinned certificate {tmp_path / 'tls_cert.pem'}"
    missing = only_failure(config.model_copy(update={"coordinator_cert": "/nonexistent/cert.pem"}))
    assert missing.detail == "--coordinator-cert /nonexistent/cert.pem does not exist"


def test_missing_round_spec() -> None:
    bad = only_failure(PeerConfig(round_spec="/nonexistent/spec.json"))
    assert bad.detail == "--round-spec /nonexistent/spec.json does not exist"


def test_invalid_round_spec(tmp_path: Path) -> None:
    (tmp_path / "spec.json").write_text(json.dumps({"round_id": "x"}))
    bad = only_failure(PeerConfig(round_spec=str(tmp_path / "spec.json")))
    assert "is not a valid round spec" in bad.detail and "base" in bad.detail


def test_missing_data(tmp_path: Path, base: Path) -> None:
    bad = only_failure(PeerConfig(round_spec=str(spec_file(tmp_path, base)), data_path="/nonexistent/data.jsonl"))
    assert bad.detail == "--data /nonexistent/data.jsonl does not exist"


def test_missing_base_model(tmp_path: Path, base: Path) -> None:
    bad = only_failure(PeerConfig(round_spec=str(spec_file(tmp_path, base, path="/nonexistent/base"))))
    assert bad.name == "base-model" and "/nonexistent/base does not exist on this machine" in bad.detail


def test_wrong_base_fingerprint(tmp_path: Path, base: Path) -> None:
    bad = only_failure(PeerConfig(round_spec=str(spec_file(tmp_path, base, fp="sha256:" + "0" * 64))))
    assert "the round expects sha256:000000000000" in bad.detail
    assert "different model or a different revision" in bad.advice


def test_good_round_spec_passes(tmp_path: Path, base: Path) -> None:
    results, spec = local_checks(PeerConfig(round_spec=str(spec_file(tmp_path, base)), quantize="nf4"))
    assert not failures(results) and spec is not None
    assert [r.name for r in results] == ["round", "round-spec", "quantize", "base-model"]


def test_span_too_large_for_memory(tmp_path: Path, base: Path) -> None:
    spec = RoundSpec.load(spec_file(tmp_path, base))
    config = PeerConfig(round_spec="x", span_index=1, device="cpu")
    ok = memory_check(config, spec, free_bytes=10**9)
    assert ok.status == "ok" and "--span-index 1-4 has 3" in ok.detail
    bad = memory_check(config, spec, free_bytes=10_000)
    assert bad.status == "fail" and "0 blocks of" in bad.detail and "--span-index 1-4 has 3" in bad.detail
    assert bad.advice == "use --quantize nf4, or free memory"
    quantized = memory_check(config.model_copy(update={"quantize": "nf4"}), spec, free_bytes=10_000)
    assert quantized.advice == "host fewer blocks (--num-blocks), or free memory"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_requested_without_cuda(tmp_path: Path, base: Path) -> None:
    from peer.selfcheck import _device, _run

    bad = _run("device", lambda: _device(PeerConfig(device="cuda")))
    assert bad.status == "fail" and "torch sees no CUDA device" in bad.detail


def test_renderers() -> None:
    results = [
        CheckResult("round", "ok", "round spec file s.json"),
        CheckResult("coordinator", "fail", "unreachable", "check the address"),
    ]
    table = render_table(results)
    assert table.splitlines()[0].startswith("OK    round")
    assert "-> check the address" in table and table.endswith("self-check failed: 1 problem(s)")
    parsed = json.loads(render_json(results))
    assert parsed["ok"] is False and parsed["checks"][1]["advice"] == "check the address"
