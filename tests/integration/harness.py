"""Starts real peer daemons (``swarm peer`` subprocesses) on 127.0.0.1 and reads their event files."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from safetensors.torch import load_file

from peer.inprocess import in_process_server  # noqa: F401 (re-exported for the tests)
from swarm.config import BaseModelRef, DataSettings, EndCondition, OptimizerSettings, RoundSpec, SpanRange

LOCAL = "/ip4/127.0.0.1/tcp/0"
#: Replicas agree to this max abs difference (the coordinator's replica check uses the same bound).
REPLICA_ATOL = 1e-6


def replica_gap(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float:
    """Max abs difference of two LoRA snapshots (inf when one is missing or their keys differ).

    hivemind applies averages as deltas (x += avg - x), so replicas are equal up to fp32 rounding, not bitwise.
    """
    if a is None or b is None or a.keys() != b.keys():
        return float("inf")
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_replicas_agree_every_epoch(x: Peer, y: Peer, min_shared: int = 2) -> list[int]:
    """Every epoch snapshot that both replicas wrote agrees to REPLICA_ATOL; returns the shared epochs."""
    shared = sorted(x.epochs() & y.epochs())
    assert len(shared) >= min_shared, f"replicas {x.name}/{y.name} share too few epochs: {shared}"
    gaps = {e: replica_gap(x.snapshot(e), y.snapshot(e)) for e in shared}
    apart = {e: g for e, g in gaps.items() if not g <= REPLICA_ATOL}
    assert not apart, f"replicas {x.name}/{y.name} differ after epochs {apart} (max abs diff; bound {REPLICA_ATOL})"
    return shared


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, period: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(period)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def coordinated_round(tmp_path: Path, spec: RoundSpec, **config: Any) -> tuple[Any, Path, list[str]]:
    """A coordinator in this process serving one round of ``spec`` (workdir ``tmp_path/coord``, 1 s heartbeats,
    30 s heartbeat timeout, 120 s to finalize; ``config`` overrides), its public key file, and the flags a peer
    joins it with. Stop it with ``server.stop()``."""
    from coordinator.config import CoordinatorConfig
    from coordinator.server import serve

    settings: dict[str, Any] = dict(port=0, metrics_port=None, workdir=tmp_path / "coord", round_spec=spec, rounds=1,
                                    heartbeat_interval_s=1.0, heartbeat_timeout_s=30.0, finalize_timeout_s=120.0)  # fmt: skip
    server = serve(CoordinatorConfig(**{**settings, **config}))
    pub_path = tmp_path / "coord" / "coordinator" / "public_key.pem"
    return server, pub_path, ["--coordinator", server.address, "--coordinator-public-key", str(pub_path)]


def make_spec(
    base: Path, data: Path, round_id: str, cuts: list[int], *, epochs: int = 8, tbs: int = 32, lr: float = 3e-3
) -> RoundSpec:
    from swarm.checkpoint import fingerprint, read_config

    layers = int(read_config(base).num_hidden_layers)
    return RoundSpec(
        round_id=round_id,
        base=BaseModelRef(path=str(base), fingerprint=fingerprint(base), num_layers=layers),
        spans=tuple(SpanRange(start=a, end=b) for a, b in zip(cuts, cuts[1:], strict=False)),
        data=DataSettings(
            train_path=str(data / "train.jsonl"), eval_path=str(data / "eval.jsonl"), seq_len=64, micro_batch_size=8
        ),
        optimizer=OptimizerSettings(lr=lr, target_batch_size=tbs, matchmaking_time=3.0, averaging_timeout=30),
        end=EndCondition(target_epochs=epochs),
    )


def save_spec(workdir: Path, spec: RoundSpec) -> Path:
    """Write ``spec`` as the round-spec file peers are started with; returns its path."""
    path = workdir / "spec.json"
    spec.save(path)
    return path


def tiny_spec(checkpoint: Path, round_id: str, cuts: list[int], *, tbs: int = 4) -> RoundSpec:
    """A round over a tiny checkpoint with spans between ``cuts`` (for in-process SpanServer tests): sequences of
    16 tokens, micro-batches of 2, ``tbs`` samples per step."""
    return RoundSpec(
        round_id=round_id,
        base=BaseModelRef(path=str(checkpoint), num_layers=cuts[-1]),
        spans=tuple(SpanRange(start=a, end=b) for a, b in zip(cuts, cuts[1:], strict=False)),
        data=DataSettings(seq_len=16, micro_batch_size=2),
        optimizer=OptimizerSettings(target_batch_size=tbs, matchmaking_time=1.0),
    )


def _group_members(pgid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


class Peer:
    """One ``swarm peer`` process with its own event file and checkpoint dir."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        spec_path: Path,
        args: list[str],
        use_spec: bool = True,
        netns: str = "",
        module: str = "swarm.cli",  # tests.integration.hostile_peer: the same peer, poisoning its gradients
    ):
        self.name, self.dir = name, workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.events_path, self.ckpt = self.dir / "events.jsonl", self.dir / "ckpt"
        self.log = open(self.dir / "log.txt", "w")  # noqa: SIM115 (closed in stop)
        spec_args = ["--round-spec", str(spec_path)] if use_spec else []
        cmd = [
            sys.executable,
            "-m",
            module,
            "peer",
            *spec_args,
            "--host-maddrs",
            LOCAL,
            "--device",
            "cpu",
            "--threads",
            "1",
            "--events-file",
            str(self.events_path),
            "--checkpoint-dir",
            str(self.ckpt),
            "--announce-period",
            "1",
            "--request-timeout",
            "10",
            *args,
        ]
        if netns:  # tests/netns: run inside that network namespace (``ip netns exec`` execs: same pid)
            cmd = ["ip", "netns", "exec", netns, *cmd]
        env = dict(os.environ, HIVEMIND_LOGLEVEL="INFO", PYTHONUNBUFFERED="1")
        # Own session: the peer and everything it forks (hivemind DHT, TaskPools, p2pd) share one process group.
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.leftovers: list[str] = []

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        rows = [json.loads(line) for line in self.events_path.read_text().splitlines() if line.strip()]
        return [r for r in rows if kind is None or r["event"] == kind]

    def ready(self, timeout: float = 120) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"peer {self.name} exited with {self.proc.returncode}: {self.tail()}")
            found = self.events("ready")
            return found[0] if found else None

        return wait_for(check, timeout, f"peer {self.name} to be ready")  # type: ignore[no-any-return]

    def snapshot(self, epoch: int) -> dict[str, Any] | None:
        files = list(self.ckpt.glob(f"span*_epoch{epoch:05d}.safetensors"))
        return load_file(str(files[0])) if files else None

    def epochs(self) -> set[int]:
        return {int(p.stem.split("epoch")[1]) for p in self.ckpt.glob("span*_epoch*.safetensors")}

    def tail(self, n: int = 3000) -> str:
        self.log.flush()
        return (self.dir / "log.txt").read_text()[-n:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        """Signal the peer, wait, then record and kill whatever is left of its process group (by group id)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        deadline = time.monotonic() + 5  # children of a cleanly stopped peer may need a moment to exit
        while (left := _group_members(self.proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.leftovers = [p.name() for p in left]
        if left:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if not self.log.closed:
            self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def demo_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny pretrained base (cached across runs by swarm.basemodel)."""
    from swarm.basemodel import make_base

    return make_base(tmp_path_factory.mktemp("base") / "base", progress=False)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from swarm.corpus import generate, write_jsonl

    out = tmp_path_factory.mktemp("data")
    write_jsonl(generate("finetune", 800, seed=1), out / "train.jsonl")
    write_jsonl(generate("finetune", 120, seed=2), out / "eval.jsonl")
    return out
