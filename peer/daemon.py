"""The peer daemon: join the DHT, host a span with LoRA, announce it, optionally train, stop cleanly."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import hivemind
import psutil
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hivemind.dht.routing import DHTID
from hivemind.p2p import PeerID
from hivemind.utils.logging import get_logger
from safetensors.torch import save_file

from peer.announce import Announcer, fetch_trainers, online_servers, record_validators, replica_status
from peer.config import PeerConfig
from peer.metrics import MetricsServer, PeerMetrics
from peer.roster_view import OPEN, Membership, RosterRefresher, RosterView
from peer.server import SpanServer
from peer.stats import PeerStats, RoundSignals
from swarm import __version__, relays
from swarm.config import RoundSpec, SpanRange
from swarm.dht_records import ONLINE, ServerAnnouncement
from swarm.identity import load_identity
from swarm.quantize import span_block_nbytes
from swarm.routing import least_served_span
from swarm.steps import step_contents

log = get_logger(__name__)
ROSTER_WAIT_S = 60.0  # how long a new member waits to appear in the coordinator's roster


def max_blocks(config: PeerConfig, spec: RoundSpec, device: str, dtype: torch.dtype) -> int | None:
    """``--num-blocks``, or on a GPU the number of blocks that fit in free memory (with 20% headroom); None on a
    CPU without ``--num-blocks`` (no limit)."""
    if config.num_blocks:
        return config.num_blocks
    if device != "cuda":
        return None
    from swarm.quantize import block_nbytes_quantized

    free, _ = torch.cuda.mem_get_info()
    per_block = block_nbytes_quantized(spec.base.path, 0, config.quantize, dtype.itemsize)
    return max(int(free * 0.8 // per_block), 0)


def resolve_device(device: str, dtype: str) -> tuple[str, torch.dtype]:
    """``auto`` picks CUDA when present; dtype ``auto`` is float32 on CPU and bfloat16 on GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but torch sees no CUDA device; use --device cpu")
    if dtype == "auto":
        return device, torch.float32 if device == "cpu" else torch.bfloat16
    return device, getattr(torch, dtype)


def _relay_options(config: PeerConfig) -> dict[str, Any]:
    """libp2p's reachability options (swarm.relays): ``auto`` leaves them to hivemind; ``private`` reserves a slot
    with ``--relays``, else the initial peers (the coordinator's DHT node comes first among them)."""
    reach = config.reach
    if reach == "auto":
        return {}
    return relays.options(reach, tuple(config.relays) or tuple(config.initial_peers))


def install_signal_handlers(stop_event: threading.Event) -> None:
    """SIGTERM/SIGINT set ``stop_event`` in this process; processes hivemind forks later die as they expect."""
    main_pid = os.getpid()

    def _stop(signum: int, _frame: Any) -> None:
        if os.getpid() != main_pid:  # a process hivemind forked (TaskPool, DHT, ...): default behaviour
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        log.info(f"Received signal {signum}: finishing the in-flight step and shutting down")
        stop_event.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)


def _p2pd_children(pid: int | None) -> list[psutil.Process]:
    """The p2pd that the DHT process ``pid`` started (hivemind forks the DHT; p2pd is its child)."""
    try:
        return [p for p in psutil.Process(pid).children() if p.name() == "p2pd"] if pid else []
    except psutil.Error:
        return []


def _wait_gone(procs: list[psutil.Process], timeout: float) -> None:
    """Wait until ``procs`` exited, then stop those left: the next round's p2pd reuses this peer's libp2p
    identity, and two daemons with one peer id at once make other peers dial the dying one."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        log.warning(f"p2pd {proc.pid} outlived the DHT shutdown by {timeout:.0f} s; stopping it")
        with contextlib.suppress(psutil.Error):
            proc.kill()


def stable_node_id(identity_path: str) -> DHTID | None:
    """The DHT node id of a libp2p identity: the same in every round (None without an identity file: random).

    A peer keeps its libp2p identity (and peer id) across rounds but starts a new DHT node each round. With a
    random node id each time, other nodes' routing tables keep the old id pointing at the same peer id, so a
    store reaches that peer twice and the second, identical store is refused: ``store`` then reports False
    although the value was stored (seen as "could not store the roster" at the start of a second round).
    """
    if not identity_path or not Path(identity_path).is_file():
        return None
    peer_id = PeerID.from_identity(Path(identity_path).read_bytes())
    return DHTID.generate(source=b"loraswarm-dht-node:" + peer_id.to_bytes())


class EventLog:
    """Optional JSON-lines file of what the daemon did (ready, eval, epoch, stopped), for scripts and tests."""

    def __init__(self, path: str):
        self.path = Path(path) if path else None
        self._lock = threading.Lock()

    def write(self, event: str, **fields: Any) -> None:
        if self.path is None:
            return
        line = json.dumps({"event": event, "time": time.time(), **fields})
        with self._lock, open(self.path, "a") as f:
            f.write(line + "\n")


class PeerDaemon:
    """Composes DHT, span server, announcer, metrics and (optionally) the trainer of one peer."""

    def __init__(
        self,
        config: PeerConfig,
        spec: RoundSpec,
        initial_state: dict[str, torch.Tensor] | None = None,
        stop_event: threading.Event | None = None,
        roster_key: Ed25519PublicKey | None = None,
        self_check: list[Any] | None = None,
    ):
        """``roster_key``: the coordinator's public key; given, the round's signed roster decides who this peer
        routes to, serves and averages with (peer.roster_view); None (a round from a spec file) admits all."""
        self.config, self.spec = config, spec
        self.self_check = list(self_check or [])  # peer.selfcheck.CheckResult of the start (served in /health)
        self.signals = RoundSignals(stop=stop_event or threading.Event())  # stop: SIGTERM/SIGINT
        self.stop_event, self.finalize_event, self.round_over = (
            self.signals.stop,
            self.signals.finalize,
            self.signals.round_over,
        )
        self.on_eval: list[Any] = []  # callbacks (phase, loss, epoch, tokens)
        self.stats = PeerStats()
        self.events = EventLog(config.events_file)
        self.metrics = PeerMetrics()
        self.device, self.dtype = resolve_device(config.device, config.dtype)
        if config.threads:
            torch.set_num_threads(config.threads)
        # the libp2p key signs this peer's DHT records in its own name (peer.announce): keep it in a file
        identity_path = config.identity_path or str(Path(tempfile.mkdtemp(prefix="loraswarm-id-")) / "identity.key")
        self.dht = hivemind.DHT(
            initial_peers=list(config.initial_peers),
            host_maddrs=list(config.host_maddrs),
            announce_maddrs=list(config.announce_maddrs) or None,
            identity_path=identity_path,
            **{"use_relay": config.use_relay, **_relay_options(config)},
            record_validators=record_validators(spec.round_id),
            node_id=stable_node_id(config.identity_path),
            start=True,
        )
        self.peer_id = str(self.dht.peer_id)
        self.identity = load_identity(identity_path)
        self.members: Membership = OPEN
        self.roster_refresher: RosterRefresher | None = None
        if roster_key is not None:
            view = RosterView.from_dht(self.dht, spec.round_id, roster_key)
            self.members, self.roster_refresher = view, RosterRefresher(view, period=2.0)
        self.metrics_server: MetricsServer | None = None
        # a trainer-only peer (--trainer-only) hosts no span: no server, nothing announced; it only trains
        self.span: SpanRange | None = None if config.trainer_only else self._choose_span()
        self.server: SpanServer | None = None
        if self.span is None:
            return
        span = self.span
        self.announcer = Announcer(self.dht, spec.round_id, self._announcement, config.announce_period, self.identity)
        self.server = SpanServer(
            spec,
            span,
            self.dht,
            step_contents=lambda epoch: step_contents(fetch_trainers(self.dht, spec.round_id, self.members), epoch),
            replicas=lambda: replica_status(self.dht, spec.round_id, (span.start, span.end), self.members),
            device=self.device,
            dtype=self.dtype,
            initial_state=initial_state,
            announce=self._announce_now,
            on_served=self.metrics.served,
            on_averaging=self.metrics.averaged,
            on_epoch=self.snapshot,
            max_batch_size=max(spec.data.micro_batch_size * 4, 1),
            activation_budget=config.activation_memory_mb << 20,
            request_wait=max(config.request_timeout, 30.0),
            quantize=config.quantize,
            members=self.members,
        )

    def max_blocks(self) -> int | None:
        return max_blocks(self.config, self.spec, self.device, self.dtype)

    def _choose_span(self) -> SpanRange:
        cfg, spans = self.config, self.spec.spans
        limit = self.max_blocks()
        if cfg.span is not None or cfg.span_index >= 0:
            if cfg.span is None and cfg.span_index >= len(spans):
                raise ValueError(f"--span-index {cfg.span_index} is out of range: the round has {len(spans)} spans")
            span = cfg.span if cfg.span is not None else spans[cfg.span_index]
            self.spec.span_index(span)
            if limit is not None and len(span) > limit:
                raise ValueError(
                    f"span {span.name} has {len(span)} blocks but this peer can host {limit} "
                    "(--num-blocks or free GPU memory)"
                )
            return span
        fitting = [s for s in spans if limit is None or len(s) <= limit]
        if not fitting:
            raise ValueError(
                f"no span of this round fits: spans have {min(len(s) for s in spans)}+ blocks, "
                f"this peer can host {limit} (--num-blocks or free GPU memory)"
            )
        served = [(a.span, a.throughput) for a in online_servers(self.dht, self.spec.round_id, self.members)]
        return least_served_span(fitting, served)

    def _announcement(self) -> ServerAnnouncement:
        assert self.server is not None
        return self.server.announcement(
            float(self.stats.throughput),
            state=ONLINE,
            version=__version__,
            adapter_version=self.spec.parent_adapter,
            maddrs=[str(m) for m in self.dht.get_visible_maddrs()],
        )

    def _announce_now(self) -> None:
        """Re-announce at once (a new epoch), so replicas deciding over announced epochs see it."""
        if self.server is not None and self.announcer.is_alive():
            try:
                self.announcer.announce_once()
            except Exception as exc:
                log.warning(f"announcement failed: {exc!r}")

    def measure_throughput(self, repeats: int = 2) -> float:
        """Samples/s of forward+backward of one micro-batch on this span (announced for routing)."""
        batch = self.spec.data.micro_batch_size
        assert self.server is not None
        x = torch.randn(batch, self.spec.data.seq_len, self.server.hidden, dtype=self.dtype, device=self.device)
        module = self.server.module
        started = time.perf_counter()
        for _ in range(repeats):
            inp = x.detach().requires_grad_(True)
            out = module(inp)
            torch.autograd.grad(out.float().pow(2).mean(), [inp])
        self.stats.throughput = batch * repeats / (time.perf_counter() - started)
        self.metrics.throughput.set(self.stats.throughput)
        return self.stats.throughput

    def health(self) -> dict[str, Any]:
        server = self.server
        return {
            "ok": not self.stop_event.is_set(),
            "peer_id": self.peer_id,
            "span": self.span.name if self.span is not None else None,  # None: a trainer-only peer
            "epoch": server.epoch if server is not None else None,
            "round_id": self.spec.round_id,
            "self_check": {
                "ok": all(c.status != "fail" for c in self.self_check),
                "checks": [{"name": c.name, "status": c.status, "detail": c.detail} for c in self.self_check],
            },
            "roster": self._roster_health(),
            # peers this one refused: all-reduce partners caught sending bad data, callers outside the roster
            "suspects": dict(server.group.suspects) if server is not None else {},
            "refused_callers": sorted(server.refused_callers)[:32] if server is not None else [],
        }

    def _roster_health(self) -> dict[str, Any]:
        """Whether a roster decides membership here, and what this peer last verified of it."""
        view = self.members
        if not isinstance(view, RosterView):
            return {"enforced": False}
        known = view.known
        return {
            "enforced": True,
            "members": len(view.members()),
            "listed": view.span_of(self.peer_id) is not None,
            "age_s": round(time.time() - view.roster_time, 1) if known else None,
            "refused_records": view.refused,
        }

    def start(self) -> None:
        if self.roster_refresher is not None:
            # the coordinator lists a member in its next roster (every few seconds); until then the others do not
            # route to, serve or average with this peer, so it waits for that before it takes part
            if not self.members.wait_listed(self.peer_id, timeout=ROSTER_WAIT_S):
                log.warning(
                    f"this peer is not in the coordinator's roster of round {self.spec.round_id} after "
                    f"{ROSTER_WAIT_S:.0f} s: the other peers will not work with it until it is"
                )
            self.roster_refresher.start()
        if self.server is not None and self.span is not None:
            self.server.start(catch_up=True)
            self.measure_throughput()
            self.metrics.set_identity(self.peer_id, self.spec.round_id, (self.span.start, self.span.end), self.device)
            self.metrics.set_block_bytes(self.config.quantize, span_block_nbytes(self.server.module))
            self.announcer.start()
        else:
            self.metrics.set_identity(self.peer_id, self.spec.round_id, None, self.device)
        if self.config.metrics_port >= 0:
            self.metrics_server = MetricsServer(
                self.metrics.registry, self.config.metrics_host, self.config.metrics_port, self.health
            )
        self.events.write(
            "ready",
            peer_id=self.peer_id,
            span=[self.span.start, self.span.end] if self.span is not None else None,
            maddrs=[str(m) for m in self.dht.get_visible_maddrs()],
            metrics_port=self.metrics_server.port if self.metrics_server else None,
            throughput=self.stats.throughput,
            epoch=self.server.epoch if self.server is not None else None,
        )
        if self.span is None:
            log.info(f"Peer {self.peer_id} trains in round {self.spec.round_id} and hosts no span (--trainer-only)")
        else:
            log.info(
                f"Peer {self.peer_id} serves span {self.span.name} of round {self.spec.round_id} "
                f"({self.stats.throughput:.1f} samples/s)"
            )

    def tick(self) -> None:
        """Periodic upkeep (metrics)."""
        if self.server is not None:
            self.metrics.epoch.set(self.server.epoch)

    def snapshot(self, epoch: int, state: dict[str, torch.Tensor]) -> None:
        """Write this span's LoRA state as settled at ``epoch`` (called by the span's epoch thread; atomic rename)."""
        if not self.config.checkpoint_dir or self.span is None:
            return
        out = Path(self.config.checkpoint_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".epoch{epoch:05d}.tmp"
        save_file(state, str(tmp), metadata={"epoch": str(epoch), "span": self.span.name, "peer_id": self.peer_id})
        os.replace(tmp, out / f"span{self.span.name}_epoch{epoch:05d}.safetensors")
        self.events.write("epoch", epoch=epoch, span=self.span.name)

    def shutdown(self) -> None:
        """Leave the DHT cleanly: withdraw the announcement, stop serving, stop hivemind (and its p2pd).

        Ends this round only: ``stop_event`` belongs to the process (signals) and may outlive this daemon.
        """
        self.round_over.set()
        started = time.perf_counter()
        if self.server is not None and self.announcer.is_alive():
            self.announcer.stop(leave=True)
        if self.roster_refresher is not None:
            self.roster_refresher.stop()
        if self.server is not None:
            self.server.shutdown()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        daemons = _p2pd_children(self.dht.pid)
        if self.dht.is_alive():
            self.dht.shutdown()
        _wait_gone(daemons, timeout=5.0)
        log.info(f"Peer {self.peer_id} shut down in {time.perf_counter() - started:.1f} s")
        self.events.write("stopped", peer_id=self.peer_id)
