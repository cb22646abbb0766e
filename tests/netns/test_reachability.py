"""``swarm peer --check`` on the namespace testbed: the coordinator dials each peer back (direct / relayed /
unreachable)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests.integration.harness import make_spec, save_spec
from tests.netns.round import netns_coordinator
from tests.netns.testbed import Testbed, run

pytestmark = [pytest.mark.netns, pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]
PORT = 31337  # the peers' fixed libp2p port (what a volunteer forwards)


def check(testbed: Testbed, ns: str, coordinator: str, key: Path, *flags: str) -> dict[str, dict[str, str]]:
    """``swarm peer --check --json`` run inside ``ns``; its checks by name."""
    argv = [sys.executable, "-m", "swarm.cli", "peer", "--check", "--json", "--coordinator", coordinator,
            "--coordinator-public-key", str(key), "--coordinator-insecure",
            "--host-maddrs", f"/ip4/0.0.0.0/tcp/{PORT}", *flags]  # fmt: skip
    started = time.monotonic()
    out = run(*argv, ns=ns, check=False, timeout=120)
    report = json.loads(out)
    print(f"{ns}: --check took {time.monotonic() - started:.1f} s")
    return {c["name"]: c for c in report["checks"]}


def test_self_check_tells_direct_from_unreachable_and_names_the_port_to_forward(
    testbed: Testbed, demo_base: Path, demo_data: Path, tmp_path: Path
) -> None:
    coord_ns = testbed.add_public("coord")
    pub = testbed.add_public("pub")
    home = testbed.add_home("home")  # a NAT with no port forwarding
    forwarded = testbed.add_home("fwd")  # a NAT whose owner forwarded TCP PORT to the peer
    testbed.forward(forwarded, PORT)
    spec_path = save_spec(tmp_path, make_spec(demo_base, demo_data, "reach", [0, 2, 4]))
    coord_ip = testbed.public_ips[coord_ns]
    # with its DHT node: the relay it offers to peers nobody reaches
    with netns_coordinator(testbed, coord_ns, spec_path, tmp_path / "coord", probe_from=pub) as coordinator:
        runs = (("public", pub, ()), ("home", home.host, ("--no-relay",)), ("forwarded", forwarded.host, ()),
                ("relayed", home.host, ("--use-auto-relay",)), ("home-auto", home.host, ()))  # fmt: skip
        results = {name: check(testbed, ns, coordinator.address, coordinator.key, *flags) for name, ns, flags in runs}
    for name, checks in results.items():
        print(f"{name}: {checks['reachability']}")
        assert checks["coordinator"]["status"] == "ok", checks["coordinator"]
        assert checks["clock"]["status"] == "ok", checks["clock"]

    public = results["public"]["reachability"]
    assert public["status"] == "ok"
    assert public["detail"].startswith(f"direct: the coordinator dialed /ip4/{testbed.public_ips[pub]}/tcp/{PORT}/")

    behind_nat = results["home"]["reachability"]
    assert behind_nat["status"] == "warn"
    assert behind_nat["detail"].startswith(f"unreachable: the coordinator could not dial this peer at its public "
                                           f"address {home.wan_ip}")  # fmt: skip
    assert f"forward TCP port {PORT} on the router to this machine" in behind_nat["advice"]

    # --use-auto-relay, and the default (auto: the coordinator did not reach it, so the daemon takes a relay slot)
    for name in ("relayed", "home-auto"):
        relayed = results[name]["reachability"]
        assert relayed["status"] == "warn", (name, relayed)
        assert relayed["detail"].startswith(f"relayed: not reachable at {home.wan_ip} directly"), (name, relayed)
        assert f"others reach it through a relay: /ip4/{coord_ip}/tcp/" in relayed["detail"], (name, relayed)
        assert "/p2p-circuit" in relayed["detail"] and "forward a TCP port" in relayed["advice"], (name, relayed)

    through_forward = results["forwarded"]["reachability"]
    assert through_forward["status"] == "ok"
    assert through_forward["detail"].startswith(f"direct: the coordinator dialed /ip4/{forwarded.wan_ip}/tcp/{PORT}/")
