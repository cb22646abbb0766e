"""A multi-host testbed from Linux network namespaces: public hosts on an "internet" bridge, homes behind NAT.

Layout (every name starts with the testbed's random prefix, so parallel testbeds never collide)::

    <p>-inet   namespace holding the bridge "br0" (the internet, 20.0.0.0/24)
    <p>-<pub>  a public host: one veth on the bridge, address 20.0.0.<n>
    <p>-<r>    a home's NAT router: WAN veth on the bridge (20.0.0.<n>), LAN veth to the home host;
               nftables masquerade on the WAN side, no port forwarding, and the forward chain drops new inbound
               connections (only replies to connections the home opened come back)
    <p>-<h>    the home host behind it: 10.<k>.0.2/24, default route via the router (10.<k>.0.1)

Rate limits are ``tc ... tbf`` on the router's interfaces: WAN egress is the home's uplink, LAN egress its downlink.
``netem`` does not exist on these machines, so there is no added delay or loss: links are as fast as the host
except for the rate limits. Needs root, ``ip`` (iproute2), ``nft`` (nftables) and ``tc``. ``close`` deletes the
namespaces by name (their veths and the bridge go with them); nothing is created outside them.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The "internet" must look public to libp2p: it builds no relay (/p2p-circuit) address over a relay whose only
# address is special-purpose (TEST-NET-2 198.51.100.0/24 was used first: no home ever became reachable through a
# relay). The prefix is routed only inside this testbed's namespaces; the host's own routes never see it.
INTERNET = "20.0.0"
REQUIRED_TOOLS = ("ip", "nft", "tc")


def missing_requirements() -> list[str]:
    """What this machine lacks to build a testbed (empty when it can)."""
    missing = [f"`{tool}` (apt-get install iproute2 nftables)" for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.append("root (network namespaces need CAP_NET_ADMIN and CAP_SYS_ADMIN)")
    return missing


def run(*argv: str, ns: str | None = None, check: bool = True, timeout: float = 30) -> str:
    """Run a command (inside namespace ``ns`` if given); raise with its stderr when it fails."""
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


@dataclass
class Home:
    router: str  # namespace of the NAT router
    host: str  # namespace of the machine behind it
    wan_ip: str  # the router's public address (what the internet sees)
    lan_ip: str  # the host's private address


@dataclass
class Testbed:
    __test__ = False  # not a pytest test class

    prefix: str = field(default_factory=lambda: "lsw" + secrets.token_hex(2))
    namespaces: list[str] = field(default_factory=list)
    public_ips: dict[str, str] = field(default_factory=dict)
    homes: dict[str, Home] = field(default_factory=dict)
    _next_ip: int = 2

    def __post_init__(self) -> None:
        try:
            self.inet = self._namespace("inet")
            run("ip", "link", "add", "br0", "type", "bridge", ns=self.inet)
            run("ip", "link", "set", "br0", "up", ns=self.inet)
        except BaseException:
            self.close()
            raise

    def _namespace(self, role: str) -> str:
        name = f"{self.prefix}-{role}"
        run("ip", "netns", "add", name)
        self.namespaces.append(name)
        run("ip", "link", "set", "lo", "up", ns=name)
        return name

    def _plug(self, ns: str, dev: str) -> str:
        """A veth from ``ns`` (named ``dev`` there) to the internet bridge; returns the host's public address."""
        outer = f"{self.prefix}{len(self.namespaces)}{dev}"[:15]
        run("ip", "link", "add", dev, "netns", ns, "type", "veth", "peer", "name", outer, "netns", self.inet)
        run("ip", "link", "set", outer, "master", "br0", "up", ns=self.inet)
        ip = f"{INTERNET}.{self._next_ip}"
        self._next_ip += 1
        run("ip", "addr", "add", f"{ip}/24", "dev", dev, ns=ns)
        run("ip", "link", "set", dev, "up", ns=ns)
        return ip

    def add_public(self, name: str) -> str:
        """A host with a public address on the internet; returns its namespace."""
        ns = self._namespace(name)
        self.public_ips[ns] = self._plug(ns, "eth0")
        return ns

    def add_home(self, name: str, up_mbit: float | None = None, down_mbit: float | None = None) -> Home:
        """A home network: a NAT router and one host behind it, optionally rate limited (tbf)."""
        k = len(self.homes) + 1
        router, host = self._namespace(f"{name}r"), self._namespace(name)
        wan_ip = self._plug(router, "wan0")
        run("ip", "link", "add", "lan0", "netns", router, "type", "veth", "peer", "name", "eth0", "netns", host)
        run("ip", "addr", "add", f"10.{k}.0.1/24", "dev", "lan0", ns=router)
        run("ip", "link", "set", "lan0", "up", ns=router)
        run("ip", "addr", "add", f"10.{k}.0.2/24", "dev", "eth0", ns=host)
        run("ip", "link", "set", "eth0", "up", ns=host)
        run("ip", "route", "add", "default", "via", f"10.{k}.0.1", ns=host)
        run("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=router)
        rules = """
table ip nat {
  chain postrouting { type nat hook postrouting priority srcnat; oifname "wan0" masquerade; }
}
table inet filter {
  chain forward {
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "lan0" oifname "wan0" accept
  }
}
"""
        subprocess.run(["ip", "netns", "exec", router, "nft", "-f", "-"], input=rules, text=True, check=True)
        if up_mbit is not None:
            self.limit(router, "wan0", up_mbit)
        if down_mbit is not None:
            self.limit(router, "lan0", down_mbit)
        home = Home(router, host, wan_ip, f"10.{k}.0.2")
        self.homes[name] = home
        return home

    @staticmethod
    def forward(home: Home, port: int) -> None:
        """Port forwarding on ``home``'s router, as a volunteer sets it up: TCP ``port`` of its public address goes
        to the same port of the host behind it (DNAT, and the forward chain lets those connections in)."""
        rules = f"""
table ip nat {{
  chain prerouting {{ type nat hook prerouting priority dstnat; iifname "wan0" tcp dport {port} dnat to {home.lan_ip}; }}
}}
add rule inet filter forward iifname "wan0" oifname "lan0" ip daddr {home.lan_ip} tcp dport {port} accept
"""
        subprocess.run(["ip", "netns", "exec", home.router, "nft", "-f", "-"], input=rules, text=True, check=True)

    @staticmethod
    def limit(ns: str, dev: str, mbit: float) -> None:
        """Egress rate limit of ``dev`` in ``ns`` with a token bucket (tbf): ``mbit`` Mbit/s, 32 KiB burst."""
        run("tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit", "burst", "32kb",
            "latency", "200ms", ns=ns)  # fmt: skip

    @staticmethod
    def unlimit(ns: str, dev: str) -> None:
        """Lift ``dev``'s rate limit in ``ns`` (back to the host's speed)."""
        run("tc", "qdisc", "del", "dev", dev, "root", ns=ns)

    def popen(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        """Start a process inside ``ns`` (environment inherited, so PYTHONPATH reaches Python children)."""
        return subprocess.Popen(["ip", "netns", "exec", ns, *argv], text=True, **kwargs)

    def python(self, ns: str, script: Path, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
        return self.popen(ns, [sys.executable, str(script), *args], **kwargs)

    def close(self) -> None:
        """Delete every namespace of this testbed by name (each delete is tried; errors are collected)."""
        errors = []
        for ns in reversed(self.namespaces):
            done = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
            if done.returncode != 0 and "No such file" not in done.stderr:
                errors.append(f"{ns}: {done.stderr.strip()}")
        self.namespaces.clear()
        if errors:
            raise RuntimeError(f"testbed teardown failed: {errors}")

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
