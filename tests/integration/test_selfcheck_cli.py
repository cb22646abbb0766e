"""``swarm peer`` fails at once on local mistakes; ``swarm peer --check`` runs p2pd and asks a real coordinator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.server import CoordinatorConfig, serve
from swarm.keys import write_public_key
from tests.integration.harness import make_spec, save_spec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def swarm_peer(*args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    done = subprocess.run(
        [sys.executable, "-m", "swarm.cli", "peer", *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    return done, time.monotonic() - started


def test_missing_public_key_fails_at_once_with_one_line() -> None:
    done, seconds = swarm_peer("--coordinator", "127.0.0.1:1", "--coordinator-public-key", "/nonexistent.pem")
    assert done.returncode != 0
    assert seconds < 10, f"took {seconds:.1f} s"  # measured ~3-4 s on a busy 2-core machine (interpreter + imports)
    assert done.stderr.strip().splitlines() == [
        "error: --coordinator-public-key /nonexistent.pem does not exist "
        "(pass the path of the PEM public key the coordinator's operator publishes)"
    ]


def test_missing_round_spec_fails_at_once() -> None:
    done, _ = swarm_peer("--round-spec", "/nonexistent/spec.json")
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == "error: --round-spec /nonexistent/spec.json does not exist (pass the round's JSON spec file)"
    )


def test_check_with_round_spec_passes(demo_base: Path, demo_data: Path, tmp_path: Path) -> None:
    spec_path = save_spec(tmp_path, make_spec(demo_base, demo_data, "r-check", [0, 2, 4]))
    done, _ = swarm_peer("--check", "--json", "--round-spec", str(spec_path), "--quantize", "nf4", "--device", "cpu")
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["ok"], done.stdout + done.stderr
    by_name = {c["name"]: c for c in report["checks"]}
    assert by_name["p2pd"]["status"] == "ok" and "started and stopped" in by_name["p2pd"]["detail"]
    assert by_name["memory"]["status"] == "ok" and "quantize nf4" in by_name["memory"]["detail"]
    assert by_name["base-model"]["detail"].endswith("matches the round's fingerprint")


def test_check_unreachable_coordinator_says_so_within_its_timeout(tmp_path: Path) -> None:
    write_public_key(Ed25519PrivateKey.generate(), tmp_path / "pub.pem")
    done, seconds = swarm_peer(
        "--check", "--coordinator", "127.0.0.1:1", "--coordinator-public-key", str(tmp_path / "pub.pem"),
        "--coordinator-insecure",
    )  # fmt: skip
    assert done.returncode == 1
    assert seconds < 30, f"took {seconds:.1f} s"  # p2pd start + the 5 s coordinator timeout + imports
    lines = [line for line in done.stdout.splitlines() if line.startswith("FAIL")]
    assert lines == ["FAIL  coordinator      coordinator 127.0.0.1:1 is unreachable (FutureTimeoutError after 5 s)"]


def test_check_against_a_real_coordinator(demo_base: Path, demo_data: Path, tmp_path: Path) -> None:
    spec = make_spec(demo_base, demo_data, "r-coord", [0, 2, 4])
    wrong = spec.model_copy(update={"base": spec.base.model_copy(update={"fingerprint": "sha256:" + "1" * 64})})
    for round_spec, expect_ok in ((spec, True), (wrong, False)):
        workdir = tmp_path / round_spec.base.fingerprint[-6:]
        server = serve(
            CoordinatorConfig(
                host="127.0.0.1", port=0, metrics_port=None, workdir=workdir, round_spec=round_spec, dht=False
            )
        )
        try:
            done, _ = swarm_peer(
                "--check", "--json", "--coordinator", server.address,
                "--coordinator-public-key", str(server.public_key_path),
            )  # fmt: skip
        finally:
            server.stop(grace=0)
        report = json.loads(done.stdout)
        by_name = {c["name"]: c for c in report["checks"]}
        assert by_name["coordinator"]["status"] == "ok", by_name["coordinator"]
        assert by_name["coordinator"]["detail"].endswith("open round r-coord")
        # the clock is compared with the coordinator's (same machine: well under a second apart)
        assert by_name["clock"]["status"] == "ok" and "version" in by_name["clock"]["detail"], by_name["clock"]
        offset = float(by_name["clock"]["detail"].split()[1])
        assert abs(offset) < 1.0, by_name["clock"]
        # the coordinator dialed the check's p2pd back at the caller's address (127.0.0.1 here)
        reach = by_name["reachability"]
        assert reach["status"] == "ok" and reach["detail"].startswith(
            "direct: the coordinator dialed /ip4/127.0.0.1/"
        ), reach["detail"]
        assert report["ok"] is expect_ok and done.returncode == (0 if expect_ok else 1)
        if not expect_ok:
            assert "the round expects sha256:111111111111" in by_name["base-model"]["detail"]


def test_a_span_choice_the_round_cannot_honour_is_one_clear_line(
    demo_base: Path, demo_data: Path, tmp_path: Path
) -> None:
    spec = make_spec(demo_base, demo_data, "r-span", [0, 2, 4])
    server = serve(
        CoordinatorConfig(host="127.0.0.1", port=0, metrics_port=None, workdir=tmp_path, round_spec=spec, dht=False)
    )
    common = ("--coordinator", server.address, "--coordinator-public-key", str(server.public_key_path))
    try:
        not_a_span, _ = swarm_peer(*common, "--span", "1:3")
        out_of_range, _ = swarm_peer(*common, "--span-index", "5")
    finally:
        server.stop(grace=0)
    assert not_a_span.returncode != 0 and out_of_range.returncode != 0
    assert (
        "error: the coordinator refused to let this peer join: span 1-3 is not a span of round 'r-span' "
        "(its spans: 0-2, 2-4): pass one of them with --span or --span-index" in not_a_span.stderr
    ), not_a_span.stderr
    assert "error: --span-index 5 is out of range: round r-span has 2 spans (0-2, 2-4)" in out_of_range.stderr
