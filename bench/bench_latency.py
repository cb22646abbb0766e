"""Latencies a volunteer and an operator see, over repeated runs of real processes on 127.0.0.1 (p50 / p90).

* ``join``: a trainer (``swarm peer --coordinator ... --data ...``) is started and reaches its first contributed
  sample, i.e. its first ``step`` event with at least one micro-batch (the event is written once the step's
  micro-batches have gone forward and backward through every span). Measured from ``Popen`` (process start:
  imports, Join, model load, DHT) and, separately, from the peer's "Joined round" log line (the Join RPC
  answered) to that event. Two trainers per run: the *first* one, whose Join completes the span cover and starts
  the round, and a *late* one that joins once the first is already training (the volunteer case).
* ``publish``: the round's end condition reached -> signed adapter published. Split in two: the trainers' last
  ``step`` event (the step that reaches ``target_epochs``) -> the coordinator's "training -> finalizing"
  transition (it learns epochs from heartbeats), then that transition -> the ``<workdir>/adapters/v1`` directory
  (the peers' final evals and span uploads, merge, signing). The coordinator runs in this process
  (``coordinator.server.serve``), so its transition and publication times are its own log records' times.
* ``failover``: one of the two replicas of span 1 is SIGKILLed while a trainer streams through it (no
  coordinator, as ``tests/integration/test_peer_failover.py``) -> the trainer's next completed ``step`` event
  ("flowing again"); the trainer's steady step period before the kill is printed next to it.

Base and data are the test suite's (``swarm.basemodel.make_base`` defaults; ``swarm.corpus`` finetune rows, 800
train / 120 eval), built once in a temporary directory. Peers run with ``--threads 1`` like the tests.

    python -m bench.bench_latency [--runs 3] [--only join,failover] [--epochs 100] [--keep] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from coordinator.config import CoordinatorConfig
from coordinator.server import serve
from swarm.basemodel import make_base
from swarm.corpus import generate, write_jsonl
from tests.integration.harness import Peer, make_spec, save_spec, wait_for

_HIVEMIND_TIME = re.compile(r"^(\w{3} +\d+ \d\d:\d\d:\d\d\.\d{3}) ")


class _Records(logging.Handler):
    """Keeps (created, message) of the coordinator's log records."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.rows: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.rows.append((record.created, record.getMessage()))

    def first(self, needle: str) -> float | None:
        return next((t for t, m in list(self.rows) if needle in m), None)


def log_time(peer: Peer, needle: str) -> float | None:
    """Unix time of the first log line of ``peer`` containing ``needle`` (hivemind's local-time stamp, ms)."""
    path = peer.dir / "log.txt"
    if not path.exists():
        return None
    year = datetime.now().year
    for line in path.read_text(errors="replace").splitlines():
        if needle in line and (m := _HIVEMIND_TIME.match(line)):
            return datetime.strptime(f"{year} {m.group(1)}", "%Y %b %d %H:%M:%S.%f").timestamp()
    return None


def first_sample(peer: Peer) -> dict[str, Any] | None:
    return next((e for e in peer.events("step") if e.get("microbatches")), None)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default); nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class Results:
    samples: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, value: float | None) -> None:
        if value is not None:
            self.samples.setdefault(name, []).append(value)


def build_inputs(root: Path) -> tuple[Path, Path]:
    base = make_base(root / "base", progress=False)
    data = root / "data"
    write_jsonl(generate("finetune", 800, seed=1), data / "train.jsonl")
    write_jsonl(generate("finetune", 120, seed=2), data / "eval.jsonl")
    return base, data


def run_round(
    run: int, root: Path, base: Path, data: Path, args: argparse.Namespace, out: Results, records: _Records
) -> None:
    """One coordinated round: server0, trainer0 (first), trainer1 (late) -> adapter v1."""
    workdir = root / f"round{run}"
    spec = make_spec(base, data, f"lat{run}", [0, 2, 4], epochs=args.epochs)
    records.rows.clear()
    server = serve(
        CoordinatorConfig(
            port=0,
            metrics_port=None,
            workdir=workdir / "coord",
            round_spec=spec,
            rounds=1,
            heartbeat_interval_s=args.heartbeat_interval,
            heartbeat_timeout_s=max(30.0, 3 * args.heartbeat_interval),
            roster_interval_s=args.roster_interval,
            finalize_timeout_s=120.0,
        )
    )
    pub = workdir / "coord" / "coordinator" / "public_key.pem"
    common = ["--coordinator", server.address, "--coordinator-public-key", str(pub)]
    train = str(data / "train.jsonl")
    peers: list[Peer] = []
    unused = workdir / "unused.json"
    adapter = workdir / "coord" / "adapters" / "v1"
    try:
        peers.append(Peer(workdir, "server0", unused, common, use_spec=False))
        peers[0].ready(180)
        started: dict[str, float] = {}
        trainers: list[Peer] = []
        for i in (0, 1):
            targs = [
                *common,
                "--data",
                train,
                "--eval-data",
                str(data / "eval.jsonl"),
                "--shard-index",
                str(i),
                "--num-shards",
                "2",
            ]
            started[f"trainer{i}"] = time.time()
            t = Peer(workdir, f"trainer{i}", unused, targs, use_spec=False)
            peers.append(t)
            trainers.append(t)
            wait_for(functools.partial(_contributed, t, adapter), args.timeout, f"{t.name}'s first sample")
        appeared = wait_for(lambda: adapter.is_dir() and time.time(), args.timeout, "adapter v1", period=0.05)
        for kind, t in zip(("first", "late"), trainers, strict=True):
            ev = first_sample(t)
            if ev is None:  # the round ended before this trainer contributed: raise --epochs
                out.notes.append(f"run {run}: the {kind} trainer joined too late to contribute (round over)")
                print(f"  run {run} {t.name} ({kind}): no sample before the round ended")
                continue
            joined, ready = log_time(t, "Joined round"), (t.events("ready") or [{}])[0].get("time")
            out.add(f"join ({kind} trainer): process start -> first sample", ev["time"] - started[t.name])
            out.add(f"join ({kind} trainer): Joined -> first sample", ev["time"] - joined if joined else None)
            out.add(f"join ({kind} trainer): process start -> Joined", joined - started[t.name] if joined else None)
            out.add(f"join ({kind} trainer): Joined -> ready event", ready - joined if ready and joined else None)
            out.add(f"join ({kind} trainer): ready event -> first sample", ev["time"] - ready if ready else None)
            print(
                f"  run {run} {t.name} ({kind}): start->Joined {_fmt(joined, started[t.name])}, "
                f"start->ready {_fmt(ready, started[t.name])}, start->first sample {ev['time'] - started[t.name]:.1f} s"
                f" (step {ev['step']}, {ev['samples']} samples)"
            )
        last_step = max(e["time"] for t in trainers for e in t.events("step"))
        finalizing = records.first("training -> finalizing")
        published = records.first("published adapter")
        out.add("publish: last step -> finalizing", finalizing - last_step if finalizing else None)
        out.add("publish: finalizing -> adapter dir", appeared - finalizing if finalizing else None)
        out.add("publish: last step -> adapter dir", appeared - last_step)
        if published and finalizing:
            out.add("publish: finalizing -> 'published' log", published - finalizing)
        print(
            f"  run {run} round end: last step -> finalizing {_fmt(finalizing, last_step)}, "
            f"finalizing -> adapters/v1 {_fmt(appeared, finalizing)}"
        )
        if run == 0:
            out.notes.append(_finalize_breakdown(trainers, finalizing, appeared))
    finally:
        for p in peers:
            p.stop()
        server.stop()
    leftovers = [p.leftovers for p in peers if p.leftovers]
    if leftovers:
        out.notes.append(f"round {run}: processes outlived their peer (killed): {leftovers}")


def _finalize_breakdown(trainers: list[Peer], finalizing: float | None, appeared: float) -> str:
    """When the trainers' final evals landed, relative to the transition (what the finalizer waits for)."""
    if finalizing is None:
        return "finalize breakdown: no 'training -> finalizing' record"
    evals = [e["time"] - finalizing for t in trainers for e in t.events("eval")][-2:]
    return (
        "run 0, seconds after 'training -> finalizing': trainers' last eval events at "
        + ", ".join(f"{x:+.1f}" for x in evals)
        + f"; adapters/v1 at {appeared - finalizing:+.1f}"
    )


def _contributed(peer: Peer, adapter: Path) -> dict[str, Any] | bool | None:
    """The first sample of ``peer``, or True once the round is over without one."""
    return (first_sample(peer) or adapter.is_dir()) if _alive(peer) else None


def _alive(peer: Peer) -> bool:
    if peer.proc.poll() is not None:
        raise RuntimeError(f"peer {peer.name} exited with {peer.proc.returncode}: {peer.tail()}")
    return True


def _fmt(t: float | None, t0: float | None) -> str:
    return f"{t - t0:.1f} s" if t is not None and t0 is not None else "n/a"


def run_failover(run: int, root: Path, base: Path, data: Path, args: argparse.Namespace, out: Results) -> None:
    """Two replicas of span 1 and a trainer on span 0; SIGKILL one replica; time to the trainer's next step."""
    workdir = root / f"failover{run}"
    workdir.mkdir(parents=True)
    spec_path = save_spec(workdir, make_spec(base, data, f"fo{run}", [0, 2, 4], epochs=200))
    peers: list[Peer] = []
    try:
        peers.append(Peer(workdir, "s1a", spec_path, ["--span-index", "1"]))
        boot = ["--initial-peers", peers[0].ready(180)["maddrs"][0]]
        peers.append(Peer(workdir, "s1b", spec_path, ["--span-index", "1", *boot]))
        peers[1].ready(180)
        trainer = Peer(
            workdir,
            "t0",
            spec_path,
            ["--span-index", "0", "--data", str(data / "train.jsonl"), "--request-timeout", "5", *boot],
        )
        peers.append(trainer)
        warm = args.steps_before_kill
        wait_for(lambda: _alive(trainer) and len(trainer.events("step")) >= warm, args.timeout, f"{warm} steps")
        before = [e["time"] for e in trainer.events("step")]
        period = statistics.median(b - a for a, b in zip(before[1:], before[2:], strict=False))
        # kill half a step period after a step closed: mid-step, with micro-batches in flight at the replicas
        n = len(before)
        wait_for(lambda: len(trainer.events("step")) > n, args.timeout, "a step to close")
        time.sleep(period / 2)
        victim = peers[0]
        killed = time.time()
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)

        def after_kill() -> list[dict[str, Any]]:
            _alive(trainer)
            return [e for e in trainer.events("step") if e["time"] > killed]

        steps = wait_for(lambda: len(after_kill()) >= 2 and after_kill(), args.timeout, "steps after the kill")
        over = log_time(trainer, "failing over")
        over_after = over if over is not None and over >= killed - 0.01 else None
        first, second = steps[0]["time"] - killed, steps[1]["time"] - killed
        out.add("failover: kill -> next completed step", first)
        out.add("failover: kill -> second completed step", second)
        out.add("failover: steady step period before the kill", period)
        if over_after is not None:
            out.add("failover: kill -> 'failing over' log", over_after - killed)
        print(
            f"  run {run} failover: kill -> next step {first:.1f} s, -> second step {second:.1f} s "
            f"(step period before {period:.1f} s; 'failing over' logged: {_fmt(over_after, killed)}; "
            f"next step {steps[0]['step']}, {steps[0]['samples']} samples)"
        )
    finally:
        for p in peers:
            p.stop()
    leftovers = [p.leftovers for p in peers if p.leftovers and p.name != "s1a"]
    if leftovers:
        out.notes.append(f"failover {run}: processes outlived their peer (killed): {leftovers}")


def summary(out: Results) -> dict[str, dict[str, Any]]:
    return {
        name: {"values": values, "p50": percentile(values, 0.5), "p90": percentile(values, 0.9)}
        for name, values in out.samples.items()
    }


def write_json(args: argparse.Namespace, out: Results) -> None:
    settings = {k: str(v) for k, v in vars(args).items()}
    args.json.write_text(json.dumps({"args": settings, "latencies": summary(out), "notes": out.notes}, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="repetitions of each scenario")
    p.add_argument("--only", default="join,failover", help="scenarios: join (a coordinated round: join and publish "
                   "latencies), failover; comma-separated")  # fmt: skip
    p.add_argument("--epochs", type=int, default=100, help="target_epochs of the coordinated round (enough that the "
                   "late trainer joins before the end)")  # fmt: skip
    p.add_argument("--heartbeat-interval", type=float, default=5.0, help="coordinator heartbeat_interval_s (default)")
    p.add_argument("--roster-interval", type=float, default=5.0, help="coordinator roster_interval_s (default)")
    p.add_argument("--steps-before-kill", type=int, default=4, help="trainer steps before the replica is killed")
    p.add_argument("--timeout", type=float, default=240.0, help="longest wait for any one event, seconds")
    p.add_argument("--workdir", type=Path, default=None, help="parent of the temporary directory")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (peer logs, events)")
    p.add_argument("--json", type=Path, default=None, help="also write the per-run values and percentiles here")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`: stop the peers (finally blocks) first
    scenarios = {s.strip() for s in args.only.split(",") if s.strip()}

    records = _Records()
    logging.getLogger("coordinator").addHandler(records)
    logging.getLogger("coordinator").setLevel(logging.INFO)
    out = Results()
    root = Path(tempfile.mkdtemp(prefix="bench-latency-", dir=args.workdir))
    began = time.monotonic()
    print(f"workdir {root}; building the demo base and data")
    base, data = build_inputs(root)
    for run in range(args.runs):
        if "join" in scenarios:
            print(f"run {run}: coordinated round ({args.epochs} epochs)")
            run_round(run, root, base, data, args, out, records)
        if "failover" in scenarios:
            print(f"run {run}: failover")
            run_failover(run, root, base, data, args, out)
        if args.json:  # after every run: an interrupted benchmark keeps what it measured
            write_json(args, out)
    print(f"\nall runs: {time.monotonic() - began:.0f} s\n")
    print("| latency (seconds) | runs | values | p50 | p90 |")
    print("|---|---|---|---|---|")
    for name, row in summary(out).items():
        values = ", ".join(f"{v:.1f}" for v in row["values"])
        print(f"| {name} | {len(row['values'])} | {values} | {row['p50']:.1f} | {row['p90']:.1f} |")
    for note in out.notes:
        print(f"\n{note}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
