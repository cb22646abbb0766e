"""A coordinator process inside a testbed namespace, as an operator runs it (plaintext: only the test talks to it)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.integration.harness import wait_for
from tests.netns.testbed import Testbed, run

NODE = str(Path(__file__).with_name("node.py"))
ANY = "/ip4/0.0.0.0/tcp/0"


@dataclass
class NetnsCoordinator:
    address: str  # HOST:PORT peers join at
    key: Path  # its public key file
    workdir: Path

    def join_flags(self) -> list[str]:
        """What a ``swarm peer`` in the testbed joins it with (libp2p on every interface, metrics on a free port)."""
        return ["--coordinator", self.address, "--coordinator-public-key", str(self.key), "--coordinator-insecure",
                "--host-maddrs", ANY, "--metrics-port", "0"]  # fmt: skip


@contextlib.contextmanager
def netns_coordinator(
    testbed: Testbed, ns: str, spec_path: Path, workdir: Path, *flags: str, probe_from: str = ""
) -> Iterator[NetnsCoordinator]:
    """``swarm coordinator`` in ``ns`` on port 50051 for the round in ``spec_path``; ready once a TCP connection
    from ``probe_from`` (another namespace; default ``ns``) reaches its gRPC port. Stopped (SIGTERM) on exit."""
    ip = testbed.public_ips[ns]
    argv = [sys.executable, "-m", "swarm.cli", "coordinator", "--host", "0.0.0.0", "--port", "50051",
            "--metrics-port", "-1", "--workdir", str(workdir), "--store", "memory", "--round-spec", str(spec_path),
            "--insecure", *flags]  # fmt: skip
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir.parent / f"{workdir.name}.log", "w") as log:
        proc = testbed.popen(ns, argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            coordinator = NetnsCoordinator(f"{ip}:50051", workdir / "coordinator" / "public_key.pem", workdir)

            def listening() -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(f"the coordinator exited with {proc.returncode}: see {log.name}")
                out = run(sys.executable, NODE, "connect", ip, "50051", ns=probe_from or ns, check=False, timeout=10)
                return coordinator.key.exists() and json.loads(out or "{}").get("connected", False)

            wait_for(listening, 90, "the coordinator's gRPC port", period=1.0)
            yield coordinator
        finally:
            proc.terminate()
            proc.wait(timeout=30)
