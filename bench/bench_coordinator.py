"""Coordinator scale: simulated peers against one real coordinator (SQLite), in a separate process.

The coordinator is ``coordinator.server.serve(CoordinatorConfig(...))`` in a child process (so its CPU and RSS
are its own, read with psutil), plaintext gRPC (``insecure``; ``--tls`` for a pinned certificate), no DHT, store
``WORKDIR/coordinator/state.sqlite3``. The load generator is one asyncio process (``grpc.aio``, one connection per
peer) whose peers do what ``peer.coordinator_link.CoordinatorLink`` does, with real per-peer Ed25519 libp2p
identities and nothing bypassed (every Join signs a fresh challenge from GetRoundSpec; every later call carries
the credential its Join returned):

1. **join**: GetRoundSpec (challenge), Join, then the "before" ReportEval (epoch 0), ramped at ``--join-rate``;
   a refused or failed Join is retried 5 times;
2. **steady** (``--duration`` s once every peer has joined): Heartbeat at ``--rate`` Hz per peer on a fixed
   schedule with a random phase, cumulative samples/tokens, the epoch advancing every 10 s; a beat still in
   flight when the next is due makes that one late (the peer never has two in flight, as a real peer);
3. **evals** (``--eval-reports``): ReportEval calls until the round holds that many reports in all (heartbeats go
   on), 16 in flight;
4. **render**: ``/metrics``, ``/`` and ``/api/status`` fetched by a separate process, under the heartbeat load;
5. **finalize**: every peer reports the round's ``target_epochs``; the round ends, each peer uploads its span
   state (a real LoRA state of ``--hidden`` x ``--rank``, identical for a span's replicas) when its heartbeat says
   ``finalize``, the coordinator assembles the candidate and names 3 evaluators, they report its eval, the adapter
   is signed and published, heartbeats answer ``stop``;
6. **idle**: the same renders with the peers gone (members and reports still in the store).

Reported: client-side round-trip latency p50/p90/p99/max per method and phase, errors by status code, offered vs
achieved heartbeat rate, late beats, members the coordinator expired, the handler time the coordinator's own
``swarm_coordinator_rpc_duration_seconds`` histogram saw, coordinator CPU (cores) and RSS, the load generator's
CPU, database size, render times. ``--sweep`` repeats phases 1-2 for several peer counts and prints one row each;
``--profile-handlers`` times the heartbeat handler and its parts in-process (no gRPC) against N members.

    python -m bench.bench_coordinator                                  # 1,000 peers at 1 Hz, 60 s, 10,000 evals
    python -m bench.bench_coordinator --sweep 50,100,200,500,1000 --duration 30
    python -m bench.bench_coordinator --profile-handlers 100,1000,2000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
from safetensors.numpy import save as save_numpy

from swarm import __version__
from swarm.adapter_tensors import lora_key
from swarm.config import BaseModelRef, EndCondition, LoraSettings, RoundSpec, SpanRange, split_even
from swarm.identity import PeerIdentity, join_payload
from swarm.proto import coordinator_pb2 as pb
from swarm.proto import coordinator_pb2_grpc as pb_grpc

ROUND_ID = "bench"
FINGERPRINT = "sha256:bench-coordinator"
TARGET_EPOCHS = 1000  # never reached in the steady phase (epoch = seconds / EPOCH_S); reported at finalize
EPOCH_S = 10.0
RPC_TIMEOUT = 15.0  # CoordinatorClient's default
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


# ----------------------------------------------------------------------------------------------- coordinator child
def serve_child(config_json: str, patch_http_spin: bool) -> None:
    """Child mode: serve ``CoordinatorConfig(**config)``, print its ports as one JSON line, stop on stdin EOF.

    ``patch_http_spin``: give waitress a whole-second loop timeout. ``swarm.http`` passes
    ``asyncore_loop_timeout=0.1``, which waitress converts with ``int()`` to 0, so the HTTP thread calls
    ``select(timeout=0)`` in a loop and holds a core (and the GIL, between calls) even when idle.
    """
    import logging

    from coordinator.server import CoordinatorConfig, serve

    if patch_http_spin:
        import swarm.http

        create = swarm.http.create_server

        def create_server(*a: Any, **kw: Any) -> Any:
            return create(*a, **{**kw, "asyncore_loop_timeout": 1})

        swarm.http.create_server = create_server  # type: ignore[assignment]

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = serve(CoordinatorConfig(**json.loads(config_json)))
    print(json.dumps({"port": server.port, "metrics_port": server.metrics_port, "pid": os.getpid()}), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.stdin.close())
    with contextlib.suppress(ValueError, OSError):
        sys.stdin.read()
    server.stop(grace=1.0)


class Coordinator:
    """The coordinator in a child process (``python -m bench.bench_coordinator --serve-config JSON``)."""

    def __init__(self, workdir: Path, spec: RoundSpec, args: argparse.Namespace) -> None:
        self.workdir = workdir
        config = dict(host="127.0.0.1", port=0, metrics_port=0, workdir=str(workdir), store=args.store,
                      round_spec=spec.model_dump(mode="json"), dht=False, insecure=not args.tls,
                      heartbeat_interval_s=1.0 / args.rate, heartbeat_timeout_s=args.heartbeat_timeout,
                      rate_limit_per_s=args.rate_limit, max_workers=args.max_workers,
                      max_concurrent_rpcs=args.max_concurrent_rpcs, finalize_poll_s=1.0,
                      finalize_timeout_s=args.finalize_wait, log_level="WARNING")  # fmt: skip
        self.log = (workdir / "coordinator.log").open("w")
        cmd = [sys.executable, "-m", "bench.bench_coordinator", "--serve-config", json.dumps(config)]
        cmd += ["--patch-http-spin"] if args.patch_http_spin else []
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"coordinator did not start; see {workdir / 'coordinator.log'}")
        info = json.loads(line)
        self.pid, self.port, self.metrics_port = self.proc.pid, info["port"], info["metrics_port"]
        self.address = f"127.0.0.1:{self.port}"
        self.http = f"http://127.0.0.1:{self.metrics_port}"
        self.cert = workdir / "coordinator" / "tls_cert.pem" if args.tls else None

    def db_bytes(self) -> int:
        base = self.workdir / "coordinator" / "state.sqlite3"
        return sum(p.stat().st_size for p in (base, Path(f"{base}-wal"), Path(f"{base}-shm")) if p.exists())

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)  # only our own child
                self.proc.wait()
        self.log.close()


# ----------------------------------------------------------------------------------------------- measurement
@dataclass
class Rpc:
    method: str
    phase: str
    start: float  # time.monotonic() at send
    latency: float
    code: str  # "OK" or the grpc status name


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


class Monitor:
    """Samples the coordinator's and this process's CPU time and the coordinator's RSS every ``period`` s."""

    def __init__(self, pid: int, period: float = 0.5) -> None:
        self.coord, self.me, self.period = psutil.Process(pid), psutil.Process(), period
        self.samples: list[tuple[float, float, float, int, int]] = []  # (t, coord cpu s, me cpu s, rss, threads)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="monitor")

    def sample(self) -> tuple[float, float, float, int, int]:
        c, m = self.coord.cpu_times(), self.me.cpu_times()
        return (time.monotonic(), c.user + c.system, m.user + m.system, self.coord.memory_info().rss,
                self.coord.num_threads())  # fmt: skip

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.samples.append(self.sample())
            except psutil.Error:
                return

    def start(self) -> Monitor:
        self.samples.append(self.sample())
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def window(self, t0: float, t1: float) -> dict[str, float]:
        """Coordinator cores used, its peak RSS (MiB) and the load generator's cores, between t0 and t1."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return {"coord_cores": math.nan, "coord_rss_mib": math.nan, "loadgen_cores": math.nan}
        a, b = inside[0], inside[-1]
        dt = b[0] - a[0]
        return {"coord_cores": (b[1] - a[1]) / dt, "coord_rss_mib": max(s[3] for s in inside) / 2**20,
                "loadgen_cores": (b[2] - a[2]) / dt, "coord_threads": max(s[4] for s in inside)}  # fmt: skip


_BUCKET = re.compile(r"^swarm_coordinator_rpc_duration_seconds_bucket\{(?P<labels>[^}]*)\} (?P<value>\S+)$")


def handler_buckets(metrics_text: str) -> dict[str, list[tuple[float, float]]]:
    """method -> [(le, cumulative count)] of the coordinator's handler-latency histogram."""
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for line in metrics_text.splitlines():
        m = _BUCKET.match(line)
        if m:
            labels = dict(kv.split("=", 1) for kv in m["labels"].split(","))
            le = labels["le"].strip('"')
            out[labels["method"].strip('"')].append((math.inf if le == "+Inf" else float(le), float(m["value"])))
    return {k: sorted(v) for k, v in out.items()}


def bucket_quantile(before: list[tuple[float, float]], after: list[tuple[float, float]], q: float) -> float:
    """Upper bound (a bucket edge) of the q-quantile of the observations made between two scrapes."""
    prev = dict(before)
    diff = [(le, n - prev.get(le, 0.0)) for le, n in after]
    total = diff[-1][1] if diff else 0.0
    if total <= 0:
        return math.nan
    return next(le for le, n in diff if n >= q * total)


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=120) as r:
        return str(r.read().decode())


HTTP_TIMER = r"""
import json, sys, time, urllib.request
base, reps, gap = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
out = {}
for _ in range(reps):
    for path in ("/metrics", "/", "/api/status"):
        t = time.perf_counter()
        with urllib.request.urlopen(base + path, timeout=120) as r:
            size = len(r.read())
        out.setdefault(path, []).append((time.perf_counter() - t, size))
        time.sleep(gap)
print(json.dumps(out))
"""


async def time_renders(base: str, reps: int) -> dict[str, list[tuple[float, int]]]:
    """GET /metrics, / and /api/status ``reps`` times from a separate process (its own GIL), 1.1 s apart (the
    status page caches its snapshot for 1 s, so every / and /api/status here rebuilds it)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", HTTP_TIMER, base, str(reps), "1.1",
                                                stdout=asyncio.subprocess.PIPE)  # fmt: skip
    out, _ = await proc.communicate()
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


# ----------------------------------------------------------------------------------------------- simulated peers
def bench_spec(layers: int, spans: int, rank: int) -> RoundSpec:
    return RoundSpec(
        round_id=ROUND_ID,
        base=BaseModelRef(path="/models/bench-tiny", fingerprint=FINGERPRINT, num_layers=layers),
        lora=LoraSettings(rank=rank, alpha=2.0 * rank, target_modules=MODULES),
        spans=split_even(layers, spans),
        end=EndCondition(target_epochs=TARGET_EPOCHS),
    )


def span_upload(span: SpanRange, hidden: int, rank: int) -> bytes:
    """A LoRA state of ``span`` (q/k/v/o, hidden x hidden), the same bytes for every replica of the span."""
    rng = np.random.default_rng(span.start)
    tensors = {}
    for block in range(span.start, span.end):
        for module in MODULES:
            tensors[lora_key(block, module, "A")] = rng.standard_normal((rank, hidden), dtype=np.float32) * 0.01
            tensors[lora_key(block, module, "B")] = rng.standard_normal((hidden, rank), dtype=np.float32) * 0.01
    return bytes(save_numpy(tensors))


def identity(i: int) -> PeerIdentity:
    return PeerIdentity.generate_ed25519(hashlib.sha256(f"bench-coordinator-peer-{i}".encode()).digest())


@dataclass
class Shared:
    """What the driver and the peers share: the phase, the records, the finalize milestones."""

    args: argparse.Namespace
    spec: RoundSpec
    phase: str = "join"
    rpcs: list[Rpc] = field(default_factory=list)
    inflight: int = 0
    joined: int = 0
    join_failed: int = 0
    rejected: Counter[str] = field(default_factory=Counter)  # heartbeat ok=False / rejoin answers by phase
    late: Counter[str] = field(default_factory=Counter)  # beats sent after their slot had passed, by phase
    milestones: dict[str, float] = field(default_factory=dict)
    uploads_ok: int = 0
    candidate_reports: int = 0
    stopped: int = 0
    uploads: dict[int, bytes] = field(default_factory=dict)
    members: list[tuple[str, str]] = field(default_factory=list)  # (peer id, credential) of joined peers

    def mark(self, name: str) -> None:
        self.milestones.setdefault(name, time.monotonic())

    async def call(self, method: str, fn: Any, request: Any, timeout: float = RPC_TIMEOUT) -> Any:
        """One RPC, recorded; returns the reply or None when it failed."""
        phase, start = self.phase, time.monotonic()
        self.inflight += 1
        try:
            reply = await fn(request, timeout=timeout)
            code = "OK"
        except grpc.aio.AioRpcError as e:
            reply, code = None, e.code().name
        finally:
            self.inflight -= 1
        self.rpcs.append(Rpc(method, phase, start, time.monotonic() - start, code))
        return reply


def open_channel(address: str, cert: Path | None) -> grpc.aio.Channel:
    # A local subchannel pool: grpc would otherwise share one TCP connection among all peers' channels.
    options: list[tuple[str, Any]] = [("grpc.use_local_subchannel_pool", 1)]
    if cert is None:
        return grpc.aio.insecure_channel(address, options=options)
    from swarm.tls import PINNED_NAME, _names_pinned

    pem = cert.read_bytes()
    if _names_pinned(pem):
        options.append(("grpc.ssl_target_name_override", PINNED_NAME))
    return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=pem), options=options)


async def peer(i: int, me: PeerIdentity, stub: pb_grpc.CoordinatorStub, sh: Shared, join_at: float) -> None:
    """One simulated peer: join, "before" eval, heartbeats, upload at finalize, candidate eval, stop."""
    args = sh.args
    await asyncio.sleep(max(0.0, join_at - time.monotonic()))
    peer_id, maddrs = me.peer_id, [f"/ip4/127.0.0.1/tcp/{40000 + i % 20000}"]
    reply = None
    for attempt in range(6):
        spec_reply = await sh.call("GetRoundSpec", stub.GetRoundSpec, pb.GetRoundSpecRequest())
        if spec_reply is not None:
            challenge = spec_reply.join_challenge
            req = pb.JoinRequest(
                peer_id=peer_id, multiaddrs=maddrs, base_fingerprint=FINGERPRINT, software_version=__version__,
                capacity=pb.Capacity(memory_bytes=8 << 30, device="cpu", throughput=100.0),
                public_key=me.public_key_pb, challenge=challenge,
                signature=me.sign(join_payload(peer_id, "", challenge, FINGERPRINT, maddrs)),
            )  # fmt: skip
            reply = await sh.call("Join", stub.Join, req)
            if reply is not None and reply.accepted:
                break
            if reply is not None:
                sh.rejected[f"join:{reply.reject_code}"] += 1
        reply = None
        await asyncio.sleep(1.0 + attempt + random.random())
    if reply is None:
        sh.join_failed += 1
        return
    sh.joined += 1
    round_id, credential, span = reply.round_id, reply.credential, reply.span
    sh.members.append((peer_id, credential))
    index = next(k for k, s in enumerate(sh.spec.spans) if s.start == span.start)

    def eval_req(epoch: int, loss: float, candidate: str = "") -> pb.ReportEvalRequest:
        return pb.ReportEvalRequest(peer_id=peer_id, round_id=round_id, epoch=epoch, eval_loss=loss,
                                    eval_tokens=640, credential=credential, candidate_sha256=candidate)  # fmt: skip

    await sh.call("ReportEval", stub.ReportEval, eval_req(0, 3.0))  # the "before" eval
    period = 1.0 / args.rate
    next_slot = time.monotonic() + random.random() * period
    samples, uploaded, named, upload_task = 0, False, False, None

    async def upload() -> None:
        nonlocal uploaded
        req = pb.UploadSpanStateRequest(peer_id=peer_id, round_id=round_id, span=span, epoch=TARGET_EPOCHS,
                                        safetensors=sh.uploads[index], samples=samples, credential=credential)  # fmt: skip
        if await sh.call("UploadSpanState", stub.UploadSpanState, req, timeout=4 * RPC_TIMEOUT) is not None:
            uploaded = True
            sh.uploads_ok += 1
            if sh.uploads_ok == sh.joined:
                sh.mark("all_uploaded")

    while sh.phase != "done":
        now = time.monotonic()
        if now < next_slot:
            await asyncio.sleep(next_slot - now)
        elif now - next_slot > period:
            sh.late[sh.phase] += 1  # the slot passed while the previous beat was in flight
            next_slot = now
        next_slot += period
        if sh.phase == "done":
            break
        finalize = sh.phase == "finalize"
        samples += 8
        epoch = TARGET_EPOCHS if finalize else min(int((time.monotonic() - sh.milestones.get("t0", now)) / EPOCH_S),
                                                   TARGET_EPOCHS - 1)  # fmt: skip
        req = pb.HeartbeatRequest(peer_id=peer_id, round_id=round_id, span=span, credential=credential,
                                  progress=pb.Progress(samples=samples, tokens=samples * 64, loss=3.0 - epoch * 1e-4,
                                                       throughput=100.0, epoch=epoch))  # fmt: skip
        hb = await sh.call("Heartbeat", stub.Heartbeat, req)
        if hb is None:
            continue
        if not hb.ok or hb.action in ("rejoin", "stop"):
            if hb.round_state == "published":
                sh.mark("published_seen")
            else:  # expired (missed heartbeats), or the round failed
                sh.rejected[f"heartbeat:{sh.phase}:{hb.action}:{hb.round_state}"] += 1
            sh.stopped += 1
            return
        if hb.action == "finalize":
            sh.mark("finalize_seen")
            if not uploaded and (upload_task is None or upload_task.done()):
                upload_task = asyncio.create_task(upload())
        if hb.eval_candidate_sha256 and not named:
            sh.mark("candidate_seen")
            if await sh.call("ReportEval", stub.ReportEval, eval_req(TARGET_EPOCHS, 2.0, hb.eval_candidate_sha256)):
                named = True
                sh.candidate_reports += 1


async def fill_evals(stubs: list[pb_grpc.CoordinatorStub], sh: Shared, total: int, concurrency: int = 16) -> None:
    """ReportEval (epoch >= 1, no candidate) round-robin over the members until ``total`` reports in all."""
    todo = max(0, total - sh.joined)  # every member already sent its "before" eval
    queue: asyncio.Queue[int] = asyncio.Queue()
    for k in range(todo):
        queue.put_nowait(k)

    async def worker() -> None:
        while not queue.empty():
            k = queue.get_nowait()
            peer_id, credential = sh.members[k % len(sh.members)]
            epoch = max(1, int((time.monotonic() - sh.milestones["t0"]) / EPOCH_S))
            req = pb.ReportEvalRequest(peer_id=peer_id, round_id=ROUND_ID, epoch=epoch, eval_loss=2.9,
                                       eval_tokens=640, credential=credential)  # fmt: skip
            await sh.call("ReportEval", stubs[k % len(stubs)].ReportEval, req)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def progress(sh: Shared, mon: Monitor, every: float = 10.0) -> None:
    last_n, last_t = 0, time.monotonic()
    while sh.phase != "done":
        await asyncio.sleep(every)
        now = time.monotonic()
        beats = [r for r in sh.rpcs[last_n:] if r.method == "Heartbeat" and r.code == "OK"]
        errors = sum(r.code != "OK" for r in sh.rpcs[last_n:])
        w = mon.window(now - every, now)
        print(f"  [{now - sh.milestones['start']:6.0f} s] {sh.phase:8s} joined {sh.joined:5d} heartbeats/s "
              f"{len(beats) / (now - last_t):7.1f} in flight {sh.inflight:4d} errors {errors:5d}  coordinator "
              f"{w['coord_cores']:.2f} cores {w['coord_rss_mib']:.0f} MiB", flush=True)  # fmt: skip
        last_n, last_t = len(sh.rpcs), now


async def run_load(coord: Coordinator, mon: Monitor, args: argparse.Namespace, spec: RoundSpec) -> dict[str, Any]:
    sh = Shared(args, spec)
    sh.uploads = {k: span_upload(s, args.hidden, args.rank) for k, s in enumerate(spec.spans)}
    ids = [identity(i) for i in range(args.peers)]
    channels = [open_channel(coord.address, coord.cert) for _ in range(args.peers)]
    stubs = [pb_grpc.CoordinatorStub(c) for c in channels]
    sh.mark("start")
    sh.milestones["t0"] = time.monotonic()
    scrapes: dict[str, dict[str, list[tuple[float, float]]]] = {}
    renders: dict[str, Any] = {}
    phases: dict[str, tuple[float, float]] = {}
    db: dict[str, int] = {}

    async def boundary(name: str) -> None:
        scrapes[name] = handler_buckets(await asyncio.to_thread(scrape, coord.http + "/metrics"))

    start = time.monotonic()
    tasks = [asyncio.create_task(peer(i, ids[i], stubs[i], sh, start + i / args.join_rate)) for i in range(args.peers)]
    reporter = asyncio.create_task(progress(sh, mon))
    await boundary("join_start")
    while sh.joined + sh.join_failed < args.peers:
        await asyncio.sleep(0.2)
    phases["join"] = (start, time.monotonic())
    await boundary("steady_start")
    sh.phase, t = "steady", time.monotonic()
    print(f"  all joins done ({sh.joined} joined, {sh.join_failed} failed) in {t - start:.1f} s; steady phase "
          f"{args.duration:g} s at {args.rate:g} Hz", flush=True)  # fmt: skip
    await asyncio.sleep(args.duration)
    phases["steady"] = (t, time.monotonic())
    await boundary("steady_end")
    db["after_steady"] = coord.db_bytes()
    if args.eval_reports:
        sh.phase, t = "evals", time.monotonic()
        print(f"  eval reports: filling to {args.eval_reports} (heartbeats go on)", flush=True)
        await fill_evals(stubs, sh, args.eval_reports)
        phases["evals"] = (t, time.monotonic())
        await boundary("evals_end")
    if args.renders:
        sh.phase, t = "render", time.monotonic()
        print(f"  render times under load ({args.renders} x /metrics, /, /api/status)", flush=True)
        renders["under_load"] = await time_renders(coord.http, args.renders)
        phases["render"] = (t, time.monotonic())
        await boundary("render_end")
    if not args.no_finalize:
        sh.phase, t = "finalize", time.monotonic()
        sh.milestones["finalize_start"] = t
        print("  finalize: every peer reports the target epoch; uploads; candidate; evals; publish", flush=True)
        deadline = t + args.finalize_wait
        while "published_seen" not in sh.milestones and time.monotonic() < deadline and sh.joined - sh.stopped > 0:
            await asyncio.sleep(0.2)
        phases["finalize"] = (t, time.monotonic())
        await boundary("finalize_end")
    sh.phase = "done"
    await asyncio.gather(*tasks, return_exceptions=True)
    reporter.cancel()
    final = pb_grpc.CoordinatorStub(channels[0])
    spec_reply = await sh.call("GetRoundSpec", final.GetRoundSpec, pb.GetRoundSpecRequest())
    for c in channels:
        await c.close()
    if args.renders:
        await asyncio.sleep(2.0)
        t = time.monotonic()
        print("  render times idle (peers gone, store kept)", flush=True)
        renders["idle"] = await time_renders(coord.http, args.renders)
        phases["idle"] = (t, time.monotonic())
    db["end"] = coord.db_bytes()
    final_state = {"state": spec_reply.state, "adapter": spec_reply.adapter_version} if spec_reply else {}
    return summarize(sh, mon, phases, scrapes, renders, db, final_state)


# ----------------------------------------------------------------------------------------------- summary
def summarize(sh: Shared, mon: Monitor, phases: dict[str, tuple[float, float]],
              scrapes: dict[str, dict[str, list[tuple[float, float]]]], renders: dict[str, Any], db: dict[str, int],
              final_state: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    args = sh.args
    by: dict[tuple[str, str], list[Rpc]] = defaultdict(list)
    for r in sh.rpcs:
        by[(r.phase, r.method)].append(r)
    rows = []
    for (phase, method), rs in sorted(by.items(), key=lambda kv: (list(phases).index(kv[0][0])
                                                                  if kv[0][0] in phases else 99, kv[0][1])):  # fmt: skip
        ok = [r.latency * 1e3 for r in rs if r.code == "OK"]
        errors = Counter(r.code for r in rs if r.code != "OK")
        rows.append({"phase": phase, "method": method, "calls": len(rs), "ok": len(ok),
                     "p50_ms": percentile(ok, 50), "p90_ms": percentile(ok, 90), "p99_ms": percentile(ok, 99),
                     "max_ms": max(ok, default=math.nan), "errors": dict(errors)})  # fmt: skip
    out: dict[str, Any] = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                           "joined": sh.joined, "join_failed": sh.join_failed, "rpcs": rows,
                           "rejected": dict(sh.rejected), "late_beats": dict(sh.late), "db_bytes": db,
                           "renders": renders, "final_round": final_state}  # fmt: skip
    res: dict[str, Any] = {}
    for name, (t0, t1) in phases.items():
        res[name] = {"seconds": t1 - t0, **mon.window(t0, t1)}
    out["resources"] = res
    t0, t1 = phases["steady"]
    beats = [r for r in sh.rpcs if r.method == "Heartbeat" and r.phase == "steady"]
    done = [r for r in beats if r.code == "OK" and t0 <= r.start + r.latency <= t1]
    out["steady"] = {"offered_per_s": sh.joined * args.rate, "achieved_per_s": len(done) / (t1 - t0),
                     "sent": len(beats), "errors": sum(r.code != "OK" for r in beats)}  # fmt: skip
    server: dict[str, dict[str, float]] = {}
    marks = list(scrapes)
    for a, b in zip(marks, marks[1:], strict=False):
        phase = {"join_start": "join", "steady_start": "steady"}.get(a, b.replace("_end", ""))
        for method, after in scrapes[b].items():
            before = scrapes[a].get(method, [])
            server[f"{phase}/{method}"] = {"p50_le_ms": bucket_quantile(before, after, 0.5) * 1e3,
                                           "p99_le_ms": bucket_quantile(before, after, 0.99) * 1e3}  # fmt: skip
    out["server_handler"] = server
    m = sh.milestones
    if "finalize_start" in m:
        fs = m["finalize_start"]
        out["finalize"] = {k: m[k] - fs for k in ("finalize_seen", "all_uploaded", "candidate_seen", "published_seen")
                           if k in m}  # fmt: skip
        out["finalize"]["uploads_ok"] = sh.uploads_ok
        out["finalize"]["candidate_reports"] = sh.candidate_reports
    return out


def fmt(x: float, digits: int = 1) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def print_report(res: dict[str, Any]) -> None:
    print("\n| phase | method | calls | ok | p50 ms | p90 ms | p99 ms | max ms | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in res["rpcs"]:
        errors = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "0"
        print(f"| {r['phase']} | {r['method']} | {r['calls']:,} | {r['ok']:,} | {fmt(r['p50_ms'])} | {fmt(r['p90_ms'])} "
              f"| {fmt(r['p99_ms'])} | {fmt(r['max_ms'])} | {errors} |")  # fmt: skip
    s = res["steady"]
    print(f"\nsteady heartbeats: offered {s['offered_per_s']:.1f}/s, achieved {s['achieved_per_s']:.1f}/s "
          f"({s['achieved_per_s'] / max(s['offered_per_s'], 1e-9):.1%}); late beats {res['late_beats']}; "
          f"joined {res['joined']}, join failed {res['join_failed']}; refused/ended {res['rejected'] or 'none'}")  # fmt: skip
    print("\n| phase | seconds | coordinator cores | coordinator peak RSS MiB | threads | load generator cores |")
    print("|---|---|---|---|---|---|")
    for name, w in res["resources"].items():
        print(f"| {name} | {w['seconds']:.1f} | {fmt(w['coord_cores'], 2)} | {fmt(w['coord_rss_mib'], 0)} | "
              f"{w.get('coord_threads', '—')} | {fmt(w['loadgen_cores'], 2)} |")  # fmt: skip
    print("\ncoordinator handler time (its own histogram; bucket edge at or above the quantile):")
    for k, v in res["server_handler"].items():
        if math.isnan(v["p50_le_ms"]):
            continue
        print(f"  {k:28s} p50 <= {fmt(v['p50_le_ms'])} ms  p99 <= {fmt(v['p99_le_ms'])} ms")
    print(f"\ndatabase: {', '.join(f'{k} {v / 2**20:.2f} MiB' for k, v in res['db_bytes'].items())}")
    for when, paths in res["renders"].items():
        for path, runs in paths.items():
            times = [t * 1e3 for t, _ in runs]
            print(f"render {when:10s} {path:12s} median {fmt(percentile(times, 50))} ms, max {fmt(max(times))} ms, "
                  f"{runs[-1][1] / 1024:,.0f} KiB")  # fmt: skip
    if "finalize" in res:
        print(f"finalize (s after the peers report the target epoch): {res['finalize']}; round {res['final_round']}")


def one_run(args: argparse.Namespace) -> dict[str, Any]:
    spec = bench_spec(args.layers, args.spans, args.rank)
    workdir = Path(tempfile.mkdtemp(prefix="bench-coordinator-", dir=args.workdir))
    coord = Coordinator(workdir, spec, args)
    mon = Monitor(coord.pid).start()
    try:
        print(f"coordinator pid {coord.pid} on {coord.address} ({'TLS' if args.tls else 'plaintext'}), "
              f"{args.store} store in {workdir}; {args.peers} peers at {args.rate:g} Hz", flush=True)  # fmt: skip
        res = asyncio.run(run_load(coord, mon, args, spec))
    finally:
        mon.stop()
        coord.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return res


# ----------------------------------------------------------------------------------------------- handler profile
def profile_handlers(sizes: list[int], store: str, reps: int = 200) -> list[dict[str, float]]:
    """Time the heartbeat handler and its parts in-process (no gRPC, no contention) against N live members."""
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="bench-coordinator-profile-") as tmp:
            row = profile_one(n, store, Path(tmp), reps)
        rows.append(row)
        print("  " + ", ".join(f"{k} {v:,.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)  # fmt: skip
    return rows


def profile_one(n: int, store: str, workdir: Path, reps: int) -> dict[str, float]:
    from prometheus_client import generate_latest

    from coordinator import handlers, handlers_data
    from coordinator.config import CoordinatorConfig
    from coordinator.context import CoordinatorContext
    from coordinator.membership import expire_members
    from coordinator.publish import continue_series
    from coordinator.round_metrics import register_round_metrics
    from coordinator.rounds import advance, round_progress
    from coordinator.state import EvalReport, Heartbeat, MemberState
    from coordinator.status_page import status_snapshot
    from coordinator.status_render import render_page

    spec = bench_spec(8, 4, 8)
    config = CoordinatorConfig(workdir=workdir, store=store, round_spec=spec, dht=False, rate_limit_per_s=0)
    ctx = CoordinatorContext.from_config(config)
    register_round_metrics(ctx)
    continue_series(ctx, time.time())
    creds = []
    t = time.perf_counter()
    for i in range(n):  # through the Join handler, each with a signed fresh challenge
        me = identity(i)
        req = pb.JoinRequest(peer_id=me.peer_id, base_fingerprint=FINGERPRINT, software_version=__version__,
                             public_key=me.public_key_pb, challenge=ctx.challenges.issue())  # fmt: skip
        req.signature = me.sign(join_payload(req.peer_id, "", req.challenge, FINGERPRINT, []))
        time.sleep(0.001)  # a challenge stamps its time rounded to 1 ms: redeemed sooner it reads as "expired"
        creds.append((me.peer_id, handlers.join(ctx, req).credential))
    join_ms = (time.perf_counter() - t) / n * 1e3
    record = ctx.store.active_round()
    assert record is not None
    samples = dict.fromkeys((p for p, _ in creds), 0)

    def progress(peer_id: str) -> int:
        samples[peer_id] += 8
        return samples[peer_id]

    def beat(k: int) -> None:
        peer_id, credential = creds[k % n]
        done = progress(peer_id)
        req = pb.HeartbeatRequest(peer_id=peer_id, round_id=ROUND_ID, credential=credential,
                                  progress=pb.Progress(samples=done, tokens=done * 64, loss=2.0, throughput=100.0,
                                                       epoch=1))  # fmt: skip
        handlers.heartbeat(ctx, req)

    def store_beat(k: int) -> None:
        peer_id = creds[k % n][0]
        done = progress(peer_id)
        ctx.store.record_heartbeat(ROUND_ID, peer_id, Heartbeat(done, done * 64, 1, 2.0, 100.0), time.time())

    def report(k: int) -> None:
        peer_id, credential = creds[k % n]
        handlers_data.report_eval(ctx, pb.ReportEvalRequest(peer_id=peer_id, round_id=ROUND_ID, epoch=1,
                                                            eval_loss=2.9, eval_tokens=640, credential=credential))  # fmt: skip

    def timed(fn: Any, k: int = reps) -> float:
        t = time.perf_counter()
        for i in range(k):
            fn(i)
        return (time.perf_counter() - t) / k * 1e3

    now = time.time()
    row = {"members": n, "join_ms": join_ms, "heartbeat_ms": timed(beat),
           "expire_members_ms": timed(lambda _: expire_members(ctx, record, now)),
           "round_progress_ms": timed(lambda _: round_progress(ctx.store, record, now)),
           "advance_ms": timed(lambda _: advance(ctx.store, record, now)),
           "list_members_ms": timed(lambda _: ctx.store.list_members(ROUND_ID, MemberState.LIVE)),
           "record_heartbeat_ms": timed(store_beat)}  # fmt: skip
    # 10 eval reports per member, written straight to the store (through the handler each costs O(reports)).
    for i in range(10 * n):
        ctx.store.add_eval_report(EvalReport(ROUND_ID, creds[i % n][0], "", 1, 2.9, 640, time.time()))
    row["report_eval_ms_at_10n"] = timed(report, k=min(reps, 20))
    row["status_page_ms"] = timed(lambda _: render_page(status_snapshot(ctx)), k=5)
    row["metrics_ms"] = timed(lambda _: generate_latest(ctx.metrics.registry), k=5)
    ctx.store.close()
    return row


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=1000, help="simulated peers (one gRPC connection each)")
    p.add_argument("--rate", type=float, default=1.0, help="heartbeats per second per peer (the coordinator's "
                   "heartbeat_interval_s is set to 1/rate; its default is 5 s, i.e. 0.2)")  # fmt: skip
    p.add_argument("--duration", type=float, default=60.0, help="seconds of steady heartbeats once all have joined")
    p.add_argument("--join-rate", type=float, default=100.0, help="joins started per second")
    p.add_argument(
        "--eval-reports",
        type=int,
        default=10_000,
        help="eval reports the round holds after the evals phase (0 = skip it; at most 49 per peer)",
    )
    p.add_argument("--renders", type=int, default=5, help="GETs of /metrics, / and /api/status per render phase")
    p.add_argument("--no-finalize", action="store_true", help="skip the finalize phase (uploads, publish)")
    p.add_argument("--finalize-wait", type=float, default=180.0, help="longest wait for the publication, seconds")
    p.add_argument("--layers", type=int, default=8, help="blocks of the (never loaded) base model")
    p.add_argument("--spans", type=int, default=4, help="spans of the round")
    p.add_argument("--hidden", type=int, default=64, help="hidden size of the uploaded LoRA states (q/k/v/o)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of the uploaded states")
    p.add_argument("--store", choices=("sqlite", "memory"), default="sqlite", help="coordinator store")
    p.add_argument("--tls", action="store_true", help="serve gRPC over TLS (pinned certificate) instead of plaintext")
    p.add_argument("--rate-limit", type=float, default=0.0,
                   help="coordinator rate_limit_per_s; 0 = off (its default, 20/s, is per address too, and every "
                   "simulated peer calls from 127.0.0.1)")  # fmt: skip
    p.add_argument("--max-workers", type=int, default=16, help="coordinator gRPC threads (its default)")
    p.add_argument("--max-concurrent-rpcs", type=int, default=64, help="coordinator limit (its default)")
    p.add_argument("--heartbeat-timeout", type=float, default=30.0, help="coordinator heartbeat_timeout_s (default)")
    p.add_argument(
        "--patch-http-spin",
        action="store_true",
        help="run the coordinator with its HTTP thread's busy loop fixed in-process (see serve_child)",
    )
    p.add_argument("--sweep", default="", help="comma-separated peer counts: phases join + steady only, one row each")
    p.add_argument("--profile-handlers", default="", help="comma-separated member counts: in-process handler times")
    p.add_argument("--workdir", type=Path, default=None, help="parent of the coordinator's temporary workdir")
    p.add_argument("--keep", action="store_true", help="keep the coordinator's workdir")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--serve-config", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_config:
        serve_child(args.serve_config, args.patch_http_spin)
        return
    if args.eval_reports > 49 * args.peers:
        p.error(f"--eval-reports: at most 49 per peer ({49 * args.peers}) under max_eval_reports = 50")
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "load_avg": os.getloadavg()}
    if args.profile_handlers:
        print(f"handler times in-process ({args.store} store), ms per call:")
        results["profile"] = profile_handlers([int(x) for x in args.profile_handlers.split(",")], args.store)
    elif args.sweep:
        rows = []
        for n in [int(x) for x in args.sweep.split(",")]:
            run_args = argparse.Namespace(**{**vars(args), "peers": n, "eval_reports": 0, "renders": 0,
                                             "no_finalize": True})  # fmt: skip
            res = one_run(run_args)
            hb = next(r for r in res["rpcs"] if r["phase"] == "steady" and r["method"] == "Heartbeat")
            srv = res["server_handler"].get("steady/Heartbeat", {})
            w, s = res["resources"]["steady"], res["steady"]
            rows.append({"peers": n, "joined": res["joined"], "join_s": res["resources"]["join"]["seconds"],
                         "offered": s["offered_per_s"], "achieved": s["achieved_per_s"], "p50": hb["p50_ms"],
                         "p99": hb["p99_ms"], "errors": s["errors"], "codes": next(
                             (r["errors"] for r in res["rpcs"] if r["phase"] == "steady" and r["method"] == "Heartbeat"),
                             {}), "late": res["late_beats"].get("steady", 0),
                         "expired": sum(v for k, v in res["rejected"].items() if k.startswith("heartbeat")),
                         "server_p99": srv.get("p99_le_ms", math.nan), "cores": w["coord_cores"],
                         "rss": w["coord_rss_mib"], "loadgen": w["loadgen_cores"],
                         "db_mib": res["db_bytes"]["end"] / 2**20})  # fmt: skip
        print("\n| peers | joined (s) | offered hb/s | achieved hb/s | p50 ms | p99 ms | handler p99 ms | errors | late | "
              "dropped | coordinator cores | RSS MiB | load gen cores | DB MiB |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['peers']:,} | {r['joined']:,} ({r['join_s']:.0f}) | {r['offered']:,.0f} | {r['achieved']:,.0f} "
                  f"| {fmt(r['p50'])} | {fmt(r['p99'])} | <= {fmt(r['server_p99'])} | {r['errors']:,} | {r['late']:,} "
                  f"| {r['expired']} | {fmt(r['cores'], 2)} | {fmt(r['rss'], 0)} | {fmt(r['loadgen'], 2)} "
                  f"| {r['db_mib']:.2f} |")  # fmt: skip
        results["sweep"] = rows
    else:
        results["run"] = one_run(args)
        print_report(results["run"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
