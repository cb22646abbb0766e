"""The namespace testbed behaves like the internet a volunteer sees: NAT, no inbound, rate-limited uplinks.

Then two hivemind DHT nodes, one public and one at home behind NAT, find each other's records through it.
Needs root, iproute2 and nftables (``.ci/run`` installs them). Without them the tests are skipped with the reason,
or fail when ``LORASWARM_REQUIRE_NETNS=1`` (CI sets it, so a broken CI machine cannot pass by skipping).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns.testbed import Testbed, run

pytestmark = [pytest.mark.netns, pytest.mark.timeout(180)]
NODE = Path(__file__).with_name("node.py")


class Procs:
    """Processes a test starts in namespaces; stopped by pid in ``stop_all``."""

    def __init__(self, bed: Testbed):
        self.bed, self.started = bed, []  # type: ignore[var-annotated]

    def start(self, ns: str, *args: str) -> subprocess.Popen[str]:
        proc = self.bed.python(ns, NODE, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.started.append(proc)
        return proc

    def result(self, proc: subprocess.Popen[str], timeout: float = 60) -> dict[str, object]:
        out, err = proc.communicate(timeout=timeout)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        assert proc.returncode == 0 and lines, f"node failed ({proc.returncode}): {err[-2000:]}"
        return dict(json.loads(lines[-1]))

    def stop_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def procs(testbed: Testbed) -> Iterator[Procs]:
    p = Procs(testbed)
    try:
        yield p
    finally:
        p.stop_all()


def wait_listening(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "listening" in line, f"sink did not start: {line!r}"


def test_nat_hides_the_home_and_masquerades_its_traffic(testbed: Testbed, procs: Procs) -> None:
    pub = testbed.add_public("pub")
    home = testbed.add_home("home")
    # Outbound from home works, and the public host sees the router's WAN address (masquerade).
    sink = procs.start(pub, "sink", "9000")
    wait_listening(sink)
    procs.result(procs.start(home.host, "source", testbed.public_ips[pub], "9000", "0.1"))
    assert procs.result(sink)["peer"] == home.wan_ip
    # Inbound to home does not: its private address has no route, and the router forwards no port.
    sink = procs.start(home.host, "sink", "9001")
    wait_listening(sink)
    to_private = procs.result(procs.start(pub, "connect", home.lan_ip, "9001"))
    to_router = procs.result(procs.start(pub, "connect", home.wan_ip, "9001"))
    assert to_private["connected"] is False and to_router["connected"] is False, (to_private, to_router)


def test_tbf_limits_the_home_uplink(testbed: Testbed, procs: Procs) -> None:
    pub = testbed.add_public("pub")
    home = testbed.add_home("home", up_mbit=20, down_mbit=100)
    assert "tbf" in run("tc", "qdisc", "show", "dev", "wan0", ns=home.router)
    sink = procs.start(pub, "sink", "9000")
    wait_listening(sink)
    procs.result(procs.start(home.host, "source", testbed.public_ips[pub], "9000", "2.5"))
    got = procs.result(sink)
    mbit = float(got["bytes"]) * 8 / float(got["seconds"]) / 1e6  # type: ignore[arg-type]
    print(f"home uplink limited to 20 Mbit/s: measured {mbit:.1f} Mbit/s")
    assert 12 <= mbit <= 21, mbit


def test_dht_nodes_connect_across_the_nat(testbed: Testbed, procs: Procs, tmp_path: Path) -> None:
    pub = testbed.add_public("pub")
    home = testbed.add_home("home")
    public_node = procs.start(pub, "dht", str(tmp_path / "pub.json"), "key-public", "key-home")
    deadline = time.monotonic() + 60
    while not (tmp_path / "pub.json").exists():
        assert public_node.poll() is None, public_node.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "public DHT node did not start"
        time.sleep(0.2)
    maddrs = json.loads((tmp_path / "pub.json").read_text())
    reachable = [m for m in maddrs if f"/ip4/{testbed.public_ips[pub]}/" in m]
    assert reachable, f"public node does not listen on its public address: {maddrs}"
    home_node = procs.start(home.host, "dht", str(tmp_path / "home.json"), "key-home", "key-public", reachable[0])
    home_result, public_result = procs.result(home_node, 120), procs.result(public_node, 120)
    print(
        f"DHT across NAT: home read the public key in {home_result['seconds']} s, public in {public_result['seconds']} s"
    )
    assert home_result["found"] == "hello from key-public"
    assert public_result["found"] == "hello from key-home"
