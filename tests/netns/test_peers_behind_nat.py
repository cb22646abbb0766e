"""Real ``swarm peer`` processes on the namespace testbed: a span server at home behind NAT, on a thin uplink; two
homes, each behind its own NAT, in one coordinated round (they reach each other through the coordinator's relay)."""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import Peer, make_spec, save_spec, wait_for
from tests.netns.round import ANY, netns_coordinator
from tests.netns.testbed import Testbed, run

pytestmark = [pytest.mark.netns, pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(400)]


def _get(ns: str, port: int, path: str) -> str:
    code = f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}{path}').read().decode())"
    return run("python3", "-c", code, ns=ns)


def metrics(ns: str, port: int) -> dict[str, dict[str, float]]:
    """The peer's /metrics, read once inside its namespace: sample name -> {its (first) label's value, or "": value}."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(_get(ns, port, "/metrics")):
        for sample in family.samples:
            found.setdefault(sample.name, {})[next(iter(sample.labels.values()), "")] = sample.value
    return found


def served(ns: str, port: int) -> dict[str, float]:
    """The peer's served requests by kind (forward, backward, ...)."""
    return metrics(ns, port).get("swarm_peer_requests_served_total", {})


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
    epochs, tbs, seq_len = 10, 16, 64
    spec_path = save_spec(tmp_path, make_spec(demo_base, demo_data, "twonat", [0, 2, 4], epochs=epochs, tbs=tbs))
    coord_ip, workdir = testbed.public_ips[coord_ns], tmp_path / "coord"
    with netns_coordinator(testbed, coord_ns, spec_path, workdir, "--heartbeat-interval", "1", "--finalize-timeout",
                           "180", probe_from=pub) as coordinator:  # fmt: skip
        joins, key = coordinator.join_flags(), coordinator.key
        peers: list[Peer] = []
        try:
            data = ["--data", str(demo_data / "train.jsonl"), "--eval-data", str(demo_data / "eval.jsonl")]
            unused = tmp_path / "unused.json"
            peers.append(Peer(tmp_path, "pub", unused, [*joins, "--span-index", "0", "--no-trainer"], False, netns=pub))
            peers[0].ready()
            started = time.monotonic()
            home_b_peer = Peer(tmp_path, "homeb", unused, [*joins, "--span-index", "1", "--no-trainer"], False,
                               netns=home_b.host)  # fmt: skip
            home_a_peer = Peer(
                tmp_path, "homea", unused, [*joins, "--span-index", "0", *data], False, netns=home_a.host
            )
            peers += [home_b_peer, home_a_peer]
            port_b = int(home_b_peer.ready()["metrics_port"])
            port_a = int(home_a_peer.ready()["metrics_port"])
            adapter = workdir / "adapters" / "v1"
            # The round is short: read the homes' metrics while they serve it (a peer closes /metrics when it ends).
            seen: dict[str, Any] = {"B": {}, "A": {}}
            first: dict[str, float] = {}
            health: dict[str, Any] = {}
            lifted = 0.0  # when the rate limits were lifted
            deadline = time.monotonic() + 300
            while not adapter.is_dir() and time.monotonic() < deadline:
                for name, ns, port in (("A", home_a.host, port_a), ("B", home_b.host, port_b)):
                    with contextlib.suppress(RuntimeError):
                        found = metrics(ns, port)
                        seen[name] = {
                            "served": found.get("swarm_peer_requests_served_total", {}),
                            "averaging": found.get("swarm_peer_averaging_rounds_total", {}),
                            "bytes": found.get("swarm_peer_bytes_total", {}),
                            "tokens": found["swarm_peer_tokens_total"][""],
                        }
                        health[name] = json.loads(_get(ns, port, "/health"))  # the last one read while it ran
                if seen["B"].get("served", {}).get("forward", 0) > 0:
                    first.setdefault("B", time.monotonic() - started)
                if seen["A"].get("averaging", {}).get("success", 0) > 0:
                    first.setdefault("A", time.monotonic() - started)
                tokens = seen["A"].get("tokens", 0)
                if tokens >= epochs // 2 * tbs * seq_len and not lifted:  # half the round done on thin links
                    for home in (home_a, home_b):
                        testbed.unlimit(home.router, "wan0")
                        testbed.unlimit(home.router, "lan0")
                    lifted = time.time()  # wall clock, as the peer's step events
                time.sleep(0.5)
            assert adapter.is_dir(), "no adapter published"
            manifest = verify_adapter(adapter, load_public_key(key))
            counts_b, averaging_a = seen["B"]["served"], seen["A"]["averaging"]
            first_b, first_a = first["B"], first["A"]
            tokens, wire = seen["A"]["tokens"], seen["A"]["bytes"]
            sent, received = wire.get("sent", 0) / tokens, wire.get("received", 0) / tokens
            link_allows = min(20e6 / 8 / max(sent, 1e-9), 100e6 / 8 / max(received, 1e-9))
            # Step durations from home A's step events (wall clock): those wholly before the lift ran on the thin
            # links, those wholly after without limits; the median step of each (an all-reduce's matchmaking
            # varies by a second or more from step to step).
            ends = sorted(e["time"] for e in home_a_peer.events("step"))
            assert len(ends) == epochs and lifted, (ends, lifted)
            steps = list(zip(ends, ends[1:], strict=False))
            thin_steps = [b - a for a, b in steps if b <= lifted]
            free_steps = [b - a for a, b in steps if a >= lifted]
            thin, free = (tbs * seq_len / statistics.median(d) for d in (thin_steps, free_steps))
            print(f"two NATs: home B first served request {first_b:.1f} s after the homes started, home A's first "
                  f"all-reduce {first_a:.1f} s; B served {counts_b}; A averaging {averaging_a}; A's trainer sends "
                  f"{sent:.0f} B/token and receives {received:.0f} B/token over its remote hops: on 20/100 Mbit/s "
                  f"{thin:.0f} tokens/s (the link allows {link_allows:.0f}), then {free:.0f} tokens/s with the limits "
                  f"lifted (the compute bound here; median of {len(thin_steps)} and {len(free_steps)} steps); held-out {manifest.eval_loss_before:.4f} -> "
                  f"{manifest.eval_loss_after:.4f}")  # fmt: skip
            assert manifest.eval_loss_after < manifest.eval_loss_before
            assert counts_b["forward"] > 0 and counts_b["backward"] > 0
            # home A averaged with the public replica at every epoch, across its NAT (no local fallback)
            assert averaging_a == {"success": epochs, "local_fallback": 0}, averaging_a
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


def test_a_public_span_server_killed_mid_round_costs_the_home_trainer_seconds(
    testbed: Testbed,
    demo_base: Path,
    demo_data: Path,
    tmp_path: Path,
) -> None:
    """Two public replicas of span 1 and a home trainer behind NAT hosting span 0. One replica's Python process
    is SIGKILLed mid-round (its p2pd goes with it: peer/orphan_guard.py): the home trainer fails over to the other
    replica within seconds, and the round publishes without the dead member."""
    import signal

    from swarm.adapter import verify_adapter
    from swarm.keys import load_public_key

    coord_ns, pub1, pub2 = (testbed.add_public(name) for name in ("coord", "pub1", "pub2"))
    home = testbed.add_home("home")
    spec_path = save_spec(tmp_path, make_spec(demo_base, demo_data, "natkill", [0, 2, 4], epochs=6, tbs=16))
    workdir, unused = tmp_path / "coord", tmp_path / "unused.json"
    with netns_coordinator(testbed, coord_ns, spec_path, workdir, "--heartbeat-interval", "1", "--heartbeat-timeout",
                           "8", "--finalize-timeout", "180", probe_from=pub1) as coordinator:  # fmt: skip
        joins = coordinator.join_flags()
        peers: list[Peer] = []
        try:
            for name, ns in (("pub1", pub1), ("pub2", pub2)):
                peers.append(Peer(tmp_path, name, unused, [*joins, "--span-index", "1", "--no-trainer"], False,
                                  netns=ns))  # fmt: skip
            victim = peers[0]
            for peer in peers:
                peer.ready()
            data = ["--data", str(demo_data / "train.jsonl"), "--eval-data", str(demo_data / "eval.jsonl")]
            trainer = Peer(tmp_path, "home", unused, [*joins, "--span-index", "0", *data], False, netns=home.host)
            peers.append(trainer)
            port = int(trainer.ready()["metrics_port"])

            reached: dict[int, float] = {}  # epoch -> when the home peer's checkpoint of it appeared

            def note_epochs() -> int:
                now = time.monotonic()
                for epoch in trainer.epochs():
                    reached.setdefault(epoch, now)
                return max(reached, default=0)

            def failovers() -> float:
                return metrics(home.host, port)["swarm_peer_failovers_total"][""]

            wait_for(lambda: note_epochs() >= 2, 180, "two epochs before the fault", period=0.2)
            failovers_before = failovers()
            epoch_at_kill, killed = note_epochs(), time.monotonic()
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait(10)
            wait_for(lambda: note_epochs() > epoch_at_kill, 120, "the home trainer's next epoch", period=0.2)
            failovers_after = failovers()
            adapter = workdir / "adapters" / "v1"
            wait_for(lambda: (note_epochs(), adapter.is_dir())[1], 300, "the published adapter", period=0.2)
            manifest = verify_adapter(adapter, load_public_key(coordinator.key))
        finally:
            codes = [p.stop() for p in peers]
    normal = max(reached[e] - reached[e - 1] for e in range(2, epoch_at_kill + 1))  # slowest epoch before the kill
    stalled = reached[epoch_at_kill + 1] - killed
    print(f"public replica SIGKILLed at epoch {epoch_at_kill}: the home trainer's next epoch came {stalled:.1f} s "
          f"later (epochs took up to {normal:.1f} s before); failovers {failovers_before:.0f} -> "
          f"{failovers_after:.0f}; held-out {manifest.eval_loss_before:.4f} -> {manifest.eval_loss_after:.4f}")  # fmt: skip
    assert manifest.eval_loss_after < manifest.eval_loss_before
    assert stalled < normal + 5, (stalled, normal)  # the kill costs the trainer less than 5 s beyond an epoch
    assert codes[0] == -signal.SIGKILL and codes[1:] == [0, 0], codes
