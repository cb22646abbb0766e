"""The coordinator's status page in headless Chromium: live peers, spans, round progress, adapters + downloads.

A coordinator on 127.0.0.1 (port 0) with two published adapters (v1 -> v2) and a round that starts
from v2; peers join, heartbeat and leave over gRPC. The screenshot lands in artifacts/status_page.png.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.server import CoordinatorConfig, CoordinatorServer, serve
from coordinator.state import AdapterRecord
from coordinator.store_sqlite import SqliteStore
from swarm import __version__
from swarm.adapter import AdapterInfo, Contributor, write_adapter
from swarm.adapter_tensors import lora_key
from swarm.config import BaseModelRef, EndCondition, LoraSettings, RoundSpec, split_even
from swarm.keys import generate_signing_key
from swarm.proto import coordinator_pb2 as pb
from swarm.proto import coordinator_pb2_grpc as pb_grpc
from tests.identities import GrpcPeers, coordinator_channel, pid

if TYPE_CHECKING:
    from selenium.webdriver import Chrome

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
HIDDEN, LAYERS = 32, 4
LORA = LoraSettings(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
SPEC = RoundSpec(
    round_id="r3-dialogue",
    base=BaseModelRef(path="/models/tiny", fingerprint="fp-tiny", num_layers=LAYERS),
    lora=LORA,
    spans=split_even(LAYERS, 2),
    end=EndCondition(target_samples=1000, deadline_s=3600),
    parent_adapter="v2",
)
PEERS = {"peer-alpha": 41.5, "peer-bravo": 37.0, "peer-charlie": 12.25, "peer-delta": 5.0}
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000")  # fmt: skip


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for block in range(LAYERS):
        for module in LORA.target_modules:
            out[lora_key(block, module, "A")] = torch.randn(LORA.rank, HIDDEN, generator=g) * 0.01
            out[lora_key(block, module, "B")] = torch.randn(HIDDEN, LORA.rank, generator=g) * 0.01
    return out


def _publish(store: SqliteStore, adapters_dir: Path, key: Ed25519PrivateKey, version: str, parent: str | None,
             round_id: str, before: float, after: float) -> None:  # fmt: skip
    info = AdapterInfo(
        version=version, parent_version=parent, round_id=round_id, base_model=SPEC.base.path,
        base_fingerprint=SPEC.base.fingerprint, eval_loss_before=before, eval_loss_after=after,
        contributors=(Contributor(peer_id="peer-alpha", samples=640, tokens=40960),
                      Contributor(peer_id="peer-bravo", samples=384, tokens=24576)),
    )  # fmt: skip
    manifest = write_adapter(adapters_dir / version, _tensors(int(version[1:])), LORA, info, key)
    store.add_adapter(AdapterRecord(version, manifest.parents, round_id, str(adapters_dir / version),
                                    manifest.weights_sha256, time.time(), before, after))  # fmt: skip


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[CoordinatorServer]:
    config = CoordinatorConfig(host="127.0.0.1", port=0, metrics_port=0, workdir=tmp_path, round_spec=SPEC,
                               dht=False, heartbeat_interval_s=1.0, heartbeat_timeout_s=60.0)  # fmt: skip
    key = generate_signing_key(tmp_path / "signing_key")
    store = SqliteStore(config.db_path)  # the registry as earlier rounds left it
    _publish(store, config.adapters_dir, key, "v1", None, "r1-instruct", 3.10, 2.71)
    _publish(store, config.adapters_dir, key, "v2", "v1", "r2-recipes", 2.71, 2.38)
    store.close()
    server = serve(config)
    yield server
    server.stop(grace=0)


def _drive_peers(server: CoordinatorServer) -> None:
    with coordinator_channel(server.address, server.tls_cert_path) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        peers = GrpcPeers(stub)
        for peer, throughput in PEERS.items():
            reply = peers.join(
                peer, multiaddrs=[f"/ip4/127.0.0.1/tcp/{4000 + len(peer)}/p2p/{pid(peer)}"],
                capacity=pb.Capacity(device="cuda:0" if throughput > 20 else "cpu", throughput=throughput),
                base_fingerprint=SPEC.base.fingerprint, software_version=__version__,
            )  # fmt: skip
            assert reply.accepted, reply.reject_reason
        time.sleep(0.2)  # counters grow at most max_samples_per_s (2000/s) since the Join
        for i, peer in enumerate(PEERS):
            assert peers.heartbeat(peer, round_id=SPEC.round_id, samples=96 * (i + 1), tokens=6144 * (i + 1),
                                   loss=2.9 - 0.1 * i, epoch=3).ok  # fmt: skip
        stub.ReportEval(pb.ReportEvalRequest(peer_id=pid("peer-alpha"), round_id=SPEC.round_id, epoch=3,
                                             eval_loss=2.31, eval_tokens=4096,
                                             credential=peers.credential("peer-alpha")), timeout=10)  # fmt: skip
        leave = pb.LeaveRequest(peer_id=pid("peer-delta"), round_id=SPEC.round_id,
                                credential=peers.credential("peer-delta"))  # fmt: skip
        assert stub.Leave(leave, timeout=10).ok


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_status_json_and_safe_downloads(coordinator: CoordinatorServer) -> None:
    _drive_peers(coordinator)
    base = f"http://127.0.0.1:{coordinator.metrics_port}"
    status, body = _get(base + "/api/status")
    snap = json.loads(body)
    assert status == 200 and snap["round"]["round_id"] == SPEC.round_id and snap["round"]["state"] == "training"
    assert {p["peer_id"]: p["state"] for p in snap["peers"]} == {
        pid("peer-alpha"): "live", pid("peer-bravo"): "live", pid("peer-charlie"): "live",
        pid("peer-delta"): "left"}  # fmt: skip
    assert [s["name"] for s in snap["spans"]] == ["0-2", "2-4"] and all(s["live_replicas"] for s in snap["spans"])
    assert [a["version"] for a in snap["adapters"]] == ["v1", "v2"] and snap["adapters"][1]["parents"] == ["v1"]
    v2 = snap["adapters"][1]
    files = {f["name"]: f["url"] for f in v2["files"]}
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors", "manifest.json", "manifest.sig"}
    status, weights = _get(base + files["adapter_model.safetensors"])
    assert status == 200 and hashlib.sha256(weights).hexdigest() == v2["sha256"]
    # a symlink planted in the adapter directory is neither listed nor served
    adapter_dir = coordinator.config.adapters_dir / "v2"
    os.symlink(coordinator.config.db_path, adapter_dir / "leak.db")
    assert "leak.db" not in _get(base + "/api/status")[1].decode()
    for bad in ("/adapters/v2/leak.db", "/adapters/v2/..%2f..%2fstate.sqlite3", "/adapters/..%2fcoordinator/state.sqlite3",
                "/adapters/v2/%2e%2e", "/adapters/v2/", "/adapters/v2", "/adapters/v9/manifest.json",
                "/adapters/v2/manifest.json%2f..%2f..%2fstate.sqlite3", "/adapters/%2e%2e/state.sqlite3"):  # fmt: skip
        status, body = _get(base + bad)
        assert status == 404 and b"SQLite" not in body, bad
    assert _get(base + "/health") == (200, b"ok\n")
    assert b"swarm_coordinator_round_info" in _get(base + "/metrics")[1]


def _chrome(profile: Path) -> Chrome:
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver") or "")
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(20)
    return driver


def _wait(condition: Callable[[], bool], deadline_s: float, what: str) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {deadline_s} s waiting for {what}"
        time.sleep(0.05)


@pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                    reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)")  # fmt: skip
def test_status_page_in_chromium(coordinator: CoordinatorServer, tmp_path: Path) -> None:
    pytest.importorskip("selenium")
    from selenium.webdriver.common.by import By

    _drive_peers(coordinator)
    driver = _chrome(tmp_path / "chromium-profile")
    try:
        driver.get(f"http://127.0.0.1:{coordinator.metrics_port}/")
        _wait(lambda: bool(driver.find_elements(By.ID, "adapters")), 15, "the page")
        find = driver.find_element
        round_el = find(By.ID, "round")
        assert round_el.get_attribute("data-state") == "training" and SPEC.round_id in round_el.text
        limits = {d.get_attribute("data-limit"): d.text for d in round_el.find_elements(By.CLASS_NAME, "limit")}
        assert set(limits) == {"samples", "seconds"} and "of 1,000 samples" in limits["samples"]  # the round's limits
        cards = {
            c.get_attribute("data-span"): c for c in find(By.ID, "swarm-map").find_elements(By.CLASS_NAME, "span-card")
        }
        assert set(cards) == {"0-2", "2-4"}
        serving = {span: {r.get_attribute("data-peer") for r in card.find_elements(By.CLASS_NAME, "peer-row")}
                   for span, card in cards.items()}  # fmt: skip
        assert set().union(*serving.values()) == {pid(p) for p in ("peer-alpha", "peer-bravo", "peer-charlie")}
        assert all(serving.values()), serving
        assert "samples/s" in cards["0-2"].text and "live" in cards["0-2"].text
        members = find(By.ID, "peers").text
        assert all(pid(p)[:6] in members for p in PEERS) and "left" in members  # ids are shortened
        rows = {
            r.get_attribute("data-version"): r
            for r in find(By.ID, "adapters").find_elements(By.CLASS_NAME, "adapter-row")
        }
        assert set(rows) == {"v1", "v2"}
        assert "2.71 → 2.38" in rows["v2"].text and "r2-recipes" in rows["v2"].text
        links = [a.get_attribute("href") or "" for a in rows["v2"].find_elements(By.CLASS_NAME, "download")]
        assert any(link.endswith("/adapters/v2/adapter_model.safetensors") for link in links)
        lineage = find(By.CLASS_NAME, "lineage")
        v1 = lineage.find_element(By.CSS_SELECTOR, 'li[data-version="v1"]')
        v2 = v1.find_element(By.CSS_SELECTOR, 'li[data-version="v2"]')  # v2 nested under v1
        assert SPEC.round_id in v2.find_element(By.CLASS_NAME, "pending").text  # the round extends v2
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1400, min(int(height) + 200, 4000))
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "status_page.png"
        assert driver.save_screenshot(str(shot)), "screenshot failed"
        print(f"status page screenshot: {shot}")
    finally:
        driver.quit()


def test_page_escapes_what_it_shows() -> None:
    """Everything on the page comes from peers and operators: it is escaped, never markup."""
    from coordinator.status_render import render_page

    evil = '<script>alert("x")</script>'
    snap = {
        "generated_at": 0.0, "software_version": evil, "rounds": [], "training_eval_loss": {}, "spans": [],
        "peers": [], "round": None,
        "adapters": [{"version": evil, "parents": [], "round_id": evil, "created_at": 0.0, "eval_loss_before": None,
                      "eval_loss_after": None, "eval_loss_reported": None, "sha256": evil, "contributors": [],
                      "files": [{"name": evil, "size": 1, "url": f"/adapters/{evil}/x"}], "error": evil}],
    }  # fmt: skip
    page = render_page(snap)
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_shared_http_server_routes() -> None:
    """swarm.http behind the peer's MetricsServer: /health JSON, metrics, HEAD, 405."""
    from peer.metrics import MetricsServer, PeerMetrics

    metrics = PeerMetrics()
    healthy = {"ok": True}
    server = MetricsServer(metrics.registry, "127.0.0.1", 0, lambda: {**healthy, "span": "0-2"})
    try:
        url = f"http://127.0.0.1:{server.port}"
        status, body = _get(url + "/health")
        assert status == 200 and json.loads(body) == {"ok": True, "span": "0-2"}
        for path in ("/health", "/metrics"):
            with urllib.request.urlopen(urllib.request.Request(url + path, method="HEAD"), timeout=10) as r:
                assert r.status == 200 and r.read() == b""
        healthy["ok"] = False
        assert _get(url + "/health")[0] == 503
        assert b"swarm_peer_memory_bytes" in _get(url + "/metrics")[1]
        assert b"swarm_peer_memory_bytes" in _get(url + "/")[1]  # any other path answers with the metrics
        post = urllib.request.Request(url + "/metrics", data=b"x", method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(post, timeout=10)
        assert info.value.code == 405
    finally:
        server.stop()
