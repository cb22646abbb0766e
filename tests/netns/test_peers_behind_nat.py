"""Real ``swarm peer`` processes on the namespace testbed: a span server at home behind NAT, on a thin uplink; two
homes, each behind its own NAT, in one coordinated round (they reach each other through the coordinator's relay)."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import Peer, make_spec, save_spec, wait_for
from tests.netns.testbed import Testbed, run

pytestmark = [pytest.mark.netns, pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(400)]
ANY = "/ip4/0.0.0.0/tcp/0"


def _get(ns: str, port: int, path: str) -> str:
    code = f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}{path}').read().decode())"
    return run("python3", "-c", code, ns=ns)


def served(ns: str, port: int, counter: str = "requests_served", label: str = "kind") -> dict[str, float]:
    """A labelled counter of the peer's /metrics (default: served requests by kind), read inside its namespace."""
    found = re.findall(
        rf'^swarm_peer_{counter}_total\{{{label}="(\w+)"\}} ([0-9.e+]+)$', _get(ns, port, "/metrics"), re.M
    )
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


def test_two_homes_behind_their_own_nats_train_a_round_through_the_coordinators_relay(
    testbed: Testbed,
    demo_base: Path,
    demo_data: Path,
    tmp_path: Path,
) -> None:
    """Coordinator and a public peer on the internet; home A (a trainer, and a second replica of span 0) and
    home B (the only server of span 1) behind NATs of their own: nothing can dial either home. Each peer's
    coordinator dials it back before libp2p starts (peer.reachability.decide); the homes start private with a
    relay slot at the coordinator's DHT node, and A's trainer calls B through it."""
    from swarm.adapter import verify_adapter
    from swarm.keys import load_public_key

    coord_ns, pub = testbed.add_public("coord"), testbed.add_public("pub")
    # both homes on a volunteer's uplink, 20 Mbit/s up and 100 Mbit/s down (tbf on their routers), for the first
    # half of the round; then the limits are lifted: the second half is what the same swarm does without them
    home_a, home_b = (testbed.add_home(name, up_mbit=20, down_mbit=100) for name in ("homea", "homeb"))
    epochs, tbs, seq_len = 6, 16, 64
    spec_path = save_spec(tmp_path, make_spec(demo_base, demo_data, "twonat", [0, 2, 4], epochs=epochs, tbs=tbs))
    coord_ip, workdir = testbed.public_ips[coord_ns], tmp_path / "coord"
    coordinator = testbed.popen(
        coord_ns,
        [sys.executable, "-m", "swarm.cli", "coordinator", "--host", "0.0.0.0", "--port", "50051",
         "--metrics-port", "-1", "--workdir", str(workdir), "--store", "memory", "--round-spec", str(spec_path),
         "--insecure", "--heartbeat-interval", "1", "--finalize-timeout", "180"],
        stdout=(coord_log := open(tmp_path / "coordinator.log", "w")), stderr=subprocess.STDOUT,  # noqa: SIM115
    )  # fmt: skip
    peers: list[Peer] = []
    try:
        key = workdir / "coordinator" / "public_key.pem"
        node = str(Path(__file__).with_name("node.py"))

        def listening() -> bool:
            out = run(sys.executable, node, "connect", coord_ip, "50051", ns=pub, check=False, timeout=10)
            return key.exists() and json.loads(out or "{}").get("connected", False)

        wait_for(listening, 90, "the coordinator's gRPC port", period=1.0)
        joins = ["--coordinator", f"{coord_ip}:50051", "--coordinator-public-key", str(key), "--coordinator-insecure",
                 "--host-maddrs", ANY, "--metrics-port", "0"]  # fmt: skip
        data = ["--data", str(demo_data / "train.jsonl"), "--eval-data", str(demo_data / "eval.jsonl")]
        unused = tmp_path / "unused.json"
        peers.append(Peer(tmp_path, "pub", unused, [*joins, "--span-index", "0", "--no-trainer"], False, netns=pub))
        peers[0].ready()
        started = time.monotonic()
        home_b_peer = Peer(tmp_path, "homeb", unused, [*joins, "--span-index", "1", "--no-trainer"], False,
                           netns=home_b.host)  # fmt: skip
        home_a_peer = Peer(tmp_path, "homea", unused, [*joins, "--span-index", "0", *data], False, netns=home_a.host)
        peers += [home_b_peer, home_a_peer]
        port_b = int(home_b_peer.ready()["metrics_port"])
        port_a = int(home_a_peer.ready()["metrics_port"])
        adapter = workdir / "adapters" / "v1"
        # The round is short: read the homes' metrics while they serve it (a peer closes /metrics when it ends).
        seen: dict[str, Any] = {"B": {}, "A": {}}
        first: dict[str, float] = {}
        health: dict[str, Any] = {}
        progress: list[tuple[float, float]] = [(0.0, 0.0)]  # (when, A's trained tokens) at each increase
        lifted: tuple[float, float] | None = None  # the progress point when the rate limits were lifted
        deadline = time.monotonic() + 300
        while not adapter.is_dir() and time.monotonic() < deadline:
            for name, ns, port in (("A", home_a.host, port_a), ("B", home_b.host, port_b)):
                with contextlib.suppress(RuntimeError):
                    text = _get(ns, port, "/metrics")
                    seen[name] = {
                        "served": served(ns, port),
                        "averaging": served(ns, port, "averaging_rounds", "outcome"),
                        "bytes": served(ns, port, "bytes", "direction"),
                        "tokens": float(re.findall(r"^swarm_peer_tokens_total ([0-9.e+]+)$", text, re.M)[0]),
                    }
                    health[name] = json.loads(_get(ns, port, "/health"))  # the last one read while it ran
            if seen["B"].get("served", {}).get("forward", 0) > 0:
                first.setdefault("B", time.monotonic() - started)
            if seen["A"].get("averaging", {}).get("success", 0) > 0:
                first.setdefault("A", time.monotonic() - started)
            tokens = seen["A"].get("tokens", 0)
            if tokens > progress[-1][1]:  # A's trainer made progress since the last read
                progress.append((time.monotonic(), tokens))
            if tokens >= epochs // 2 * tbs * seq_len and not lifted:  # half the round done on thin links
                for home in (home_a, home_b):
                    testbed.unlimit(home.router, "wan0")
                    testbed.unlimit(home.router, "lan0")
                lifted = progress[-1]
            time.sleep(0.5)
        assert adapter.is_dir(), "no adapter published"
        manifest = verify_adapter(adapter, load_public_key(key))
        counts_b, averaging_a = seen["B"]["served"], seen["A"]["averaging"]
        first_b, first_a = first["B"], first["A"]
        tokens, wire = seen["A"]["tokens"], seen["A"]["bytes"]
        sent, received = wire.get("sent", 0) / tokens, wire.get("received", 0) / tokens
        link_allows = min(20e6 / 8 / max(sent, 1e-9), 100e6 / 8 / max(received, 1e-9))
        assert lifted is not None and progress[-1][1] == epochs * tbs * seq_len, progress
        (t0, n0), (t1, n1), (t2, n2) = progress[1], lifted, progress[-1]  # first step, limits lifted, last step
        thin, free = (n1 - n0) / (t1 - t0), (n2 - n1) / (t2 - t1)  # tokens/s on 20/100 Mbit/s, then unlimited
        print(f"two NATs: home B first served request {first_b:.1f} s after the homes started, home A's first "
              f"all-reduce {first_a:.1f} s; B served {counts_b}; A averaging {averaging_a}; A's trainer sends "
              f"{sent:.0f} B/token and receives {received:.0f} B/token over its remote hops: on 20/100 Mbit/s "
              f"{thin:.0f} tokens/s (the link allows {link_allows:.0f}), then {free:.0f} tokens/s with the limits "
              f"lifted (the compute bound here); held-out {manifest.eval_loss_before:.4f} -> "
              f"{manifest.eval_loss_after:.4f}")  # fmt: skip
        assert manifest.eval_loss_after < manifest.eval_loss_before
        assert counts_b["forward"] > 0 and counts_b["backward"] > 0
        assert first_b <= 30  # the bound from start to first served request
        # the bound: at least 70% of what the link allows or of the compute bound, whichever is lower
        assert thin >= 0.7 * min(link_allows, free), (thin, link_allows, free)
        for name, peer in (("A", home_a_peer), ("B", home_b_peer)):
            log = (peer.dir / "log.txt").read_text()
            assert "reachability: reached through a relay (unreachable: " in log, (name, peer.tail())
            checks = {c["name"]: c for c in health[name]["self_check"]["checks"]}
            assert checks["reachability"]["detail"].startswith("relayed: "), (name, checks["reachability"])
            assert f"/ip4/{coord_ip}/tcp/" in checks["reachability"]["detail"], checks["reachability"]
        pub_log = (peers[0].dir / "log.txt").read_text()
        assert "reachability: reachable directly (direct: " in pub_log
    finally:
        for p in reversed(peers):
            p.stop()
        coordinator.terminate()
        coordinator.wait(timeout=30)
        coord_log.close()
