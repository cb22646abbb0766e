"""Real ``swarm peer`` processes on the namespace testbed: a span server at home behind NAT, on a thin uplink."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.integration.harness import Peer, make_spec, save_spec, wait_for
from tests.netns.testbed import Testbed, run

pytestmark = [pytest.mark.netns, pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(400)]
ANY = "/ip4/0.0.0.0/tcp/0"


def served(ns: str, port: int) -> dict[str, float]:
    """The peer's served-request counters, read from its /metrics inside its namespace."""
    code = f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics').read().decode())"
    text = run("python3", "-c", code, ns=ns)
    found = re.findall(r'^swarm_peer_requests_served_total\{kind="(\w+)"\} ([0-9.e+]+)$', text, re.M)
    return {kind: float(v) for kind, v in found}


def test_public_trainer_uses_a_span_server_behind_nat(
    testbed: Testbed,
    demo_base: Path,
    demo_data: Path,
    tmp_path: Path,
) -> None:
    pub = testbed.add_public("pub")
    home = testbed.add_home("home", up_mbit=20, down_mbit=100)
    spec_path = save_spec(tmp_path, make_spec(demo_base, demo_data, "nat1", [0, 2, 4], epochs=2, tbs=16))
    peers: list[Peer] = []
    try:
        # The public peer hosts span 0 and trains; the home peer dials it (its only initial peer) and serves span 1:
        # the trainer reaches the home through the connection the home opened (nothing can dial into the NAT).
        data = ["--data", str(demo_data / "train.jsonl")]
        trainer = Peer(tmp_path, "trainer", spec_path, ["--host-maddrs", ANY, "--span-index", "0", *data], netns=pub)
        peers.append(trainer)
        maddr = next(m for m in trainer.ready()["maddrs"] if f"/ip4/{testbed.public_ips[pub]}/" in m)
        started = time.monotonic()
        home_args = ["--host-maddrs", ANY, "--span-index", "1", "--initial-peers", maddr, "--metrics-port", "0"]
        home_peer = Peer(tmp_path, "home", spec_path, [*home_args, "--no-trainer"], netns=home.host)
        peers.append(home_peer)
        metrics_port = int(home_peer.ready()["metrics_port"])
        wait_for(lambda: served(home.host, metrics_port).get("forward", 0) > 0, 120, "the home peer's first request")
        first_request = time.monotonic() - started
        evals = wait_for(
            lambda: len(trainer.events("eval")) >= 2 and trainer.events("eval"), 240, "the trainer's evals"
        )
        counts = served(home.host, metrics_port)
        print(f"home behind NAT (20/100 Mbit/s): first served request {first_request:.1f} s after it started; {counts}")
        before, after = (e["loss"] for e in evals[:2])
        assert after < before, (before, after)
        assert counts["forward"] > 0 and counts["backward"] > 0
        assert first_request <= 30  # the bound from start to first served request
    finally:
        for p in reversed(peers):
            p.stop()
