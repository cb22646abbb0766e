"""Start a peer from its config: get the round (file or coordinator), run the daemon, follow round changes."""

from __future__ import annotations

import functools
import tempfile
import threading
from pathlib import Path
from typing import Any

import grpc
import psutil
import torch
from hivemind.p2p import P2P, PeerID
from hivemind.utils.logging import get_logger

from peer.config import PeerConfig
from peer.coordinator_client import CoordinatorClient, JoinRejectedError
from peer.daemon import PeerDaemon, install_signal_handlers
from swarm.config import RoundSpec, SpanRange
from swarm.identity import load_identity
from swarm.keys import load_public_key

log = get_logger(__name__)


def run_peer(config: PeerConfig) -> None:
    """Blocking: serve (and train) until SIGTERM/SIGINT; always leaves the DHT and stops p2pd."""
    if not (config.coordinator or config.round_spec):
        raise ValueError("no round: pass --round-spec FILE or --coordinator HOST:PORT")
    from peer.selfcheck import raise_on_local_failures

    checks = raise_on_local_failures(config)  # files, keys, base model: fail at once, before any network wait
    from peer.orphan_guard import start_orphan_guard

    start_orphan_guard()  # if this process is killed, p2pd and hivemind's workers are stopped too
    stop = threading.Event()
    install_signal_handlers(stop)
    if config.coordinator:
        _run_with_coordinator(config, stop, checks)
    else:
        _run_round(PeerDaemon(config, RoundSpec.load(config.round_spec), stop_event=stop, self_check=checks))


def _run_round(daemon: PeerDaemon, on_start: object = None) -> None:
    try:
        daemon.start()
        if callable(on_start):
            on_start()
        if daemon.config.is_trainer:
            from peer.training_loop import TrainingLoop

            TrainingLoop(daemon).run()
        while not (daemon.stop_event.wait(0.5) or daemon.round_over.is_set()):
            daemon.tick()
    finally:
        daemon.shutdown()


def _identity(config: PeerConfig) -> tuple[str, str]:
    """The libp2p key file (created if needed) and its peer id, known before the DHT starts."""
    path = config.identity_path or str(Path(tempfile.mkdtemp(prefix="loraswarm-id-")) / "identity.key")
    if not Path(path).exists():
        P2P.generate_identity(path)
    return path, str(PeerID.from_identity(Path(path).read_bytes()))


def _run_with_coordinator(config: PeerConfig, stop: threading.Event, checks: list[Any] | None = None) -> None:
    from peer.coordinator_link import CoordinatorLink

    if not config.coordinator_public_key:
        raise ValueError("--coordinator needs --coordinator-public-key FILE to verify the adapters it publishes")
    identity, peer_id = _identity(config)
    client = CoordinatorClient(config.coordinator, config.join_token, identity=load_identity(identity),
                               cert=config.coordinator_cert_path,
                               public_key=load_public_key(config.coordinator_public_key))  # fmt: skip
    try:
        while not stop.is_set():
            joined = _join_when_open(client, config, peer_id, stop)
            if joined is None:
                break
            spec, span, resp, local_fp = joined
            if span is None:
                log.info(f"Joined round {spec.round_id} as {peer_id}: a trainer that hosts no span (--trainer-only)")
            else:
                chosen = (
                    "the span this peer asked for"
                    if config.span or config.span_index >= 0
                    else "chosen by the coordinator"
                )
                log.info(f"Joined round {spec.round_id} as {peer_id}: span {span.name} ({chosen})")
            link = CoordinatorLink(client, config, peer_id, spec, local_fp)
            initial = link.parent_state()
            decision = _decide_reachability(config, client, trainer_only=span is None)
            peer_config = config.model_copy(
                update={
                    "span": span,
                    "identity_path": identity,
                    "initial_peers": tuple(resp.dht_initial_peers) + tuple(config.initial_peers),
                    "reachability": decision.reach or "auto",
                    "relays": decision.relays,
                    "use_auto_relay": False,
                }
            )
            daemon = PeerDaemon(peer_config, spec, initial_state=initial, stop_event=stop, roster_key=client.public_key,
                                self_check=checks)  # fmt: skip
            link.attach(daemon.server, daemon.stats, daemon.signals, resp.heartbeat_interval_s or 2.0)
            daemon.on_eval.append(link.report_eval)

            _run_round(daemon, on_start=functools.partial(_started, link, client, daemon))
            link.stop()
            if stop.is_set():  # a signal, not a round change
                try:
                    client.leave(peer_id, spec.round_id)
                except Exception as exc:  # leaving is a courtesy: the heartbeat timeout covers it
                    log.warning(f"could not tell the coordinator we leave: {exc}")
    finally:
        client.close()


def _decide_reachability(config: PeerConfig, client: CoordinatorClient, trainer_only: bool) -> Any:
    """How this peer's libp2p starts (peer.reachability.decide): public, private behind a relay, or libp2p's own
    guess. A trainer-only peer only dials out, so it is not asked about (``--reachability`` still applies)."""
    from peer.reachability import Decision, decide

    if trainer_only and config.reach == "auto":
        return Decision(None)
    try:
        decision = decide(config, client)
    except ValueError:
        raise
    except Exception as exc:  # the coordinator is busy or old: start as libp2p would, the check runs again later
        # (decide asks only when it must: "private" with --relays, or "public", never get here)
        log.warning(f"reachability not asked ({type(exc).__name__}: {str(exc)[:200]}); libp2p decides")
        return Decision(None)
    log.info(f"reachability: {decision.summary()}")
    return decision


def _started(link: Any, client: CoordinatorClient, daemon: PeerDaemon) -> None:
    link.start()
    _check_reachability_soon(client, daemon)


def _check_reachability_soon(client: CoordinatorClient, daemon: PeerDaemon) -> None:
    """Let the coordinator dial this peer's libp2p node back (peer.reachability), in the background; the answer
    goes to the log and to /health's self_check. A failed check is logged, never fatal."""
    from peer.reachability import check_with, visible_maddrs
    from peer.selfcheck import CheckResult

    def run() -> None:
        try:
            maddrs = visible_maddrs(
                lambda: daemon.dht.get_visible_maddrs(latest=True), daemon.config.reach == "private"
            )
            found = check_with(client, daemon.peer_id, maddrs, daemon.config.host_maddrs)
            detail = f"{found.reach}: {found.detail}"
            result = CheckResult("reachability", "ok" if found.reach == "direct" else "warn", detail, found.advice)
        except Exception as exc:  # the coordinator is busy, old, or gone: say so, keep serving
            result = CheckResult("reachability", "skip", f"not checked: {type(exc).__name__}: {exc}"[:300])
        daemon.self_check.append(result)
        (log.info if result.status == "ok" else log.warning)(f"self-check {result.line()}")

    threading.Thread(target=run, name="reachability-check", daemon=True).start()


def _span_choice(config: PeerConfig, spec: RoundSpec, device: str) -> tuple[SpanRange | None, int]:
    """The span this volunteer asked for (``--span`` / ``--span-index``; None = the coordinator chooses) and the
    most blocks it hosts (``--num-blocks`` or free GPU memory; 0 = no limit), sent with ``Join``."""
    from peer.daemon import max_blocks, resolve_device

    wanted = config.span
    if wanted is None and config.span_index >= 0:
        if config.span_index >= len(spec.spans):
            names = ", ".join(s.name for s in spec.spans)
            raise ValueError(f"--span-index {config.span_index} is out of range: round {spec.round_id} has "
                             f"{len(spec.spans)} spans ({names})")  # fmt: skip
        wanted = spec.spans[config.span_index]
    limit = max_blocks(config, spec, device, resolve_device(config.device, config.dtype)[1])
    if limit == 0:
        raise ValueError("free GPU memory holds no block of this base model: free memory, use --quantize nf4, or "
                         "run on another device")  # fmt: skip
    return wanted, limit or 0


def _join_when_open(
    client: CoordinatorClient, config: PeerConfig, peer_id: str, stop: threading.Event, period: float = 2.0
) -> tuple[RoundSpec, SpanRange | None, Any, str] | None:
    """Join the coordinator's open round; wait (saying so once) while it is unreachable or has no open round."""
    from swarm.checkpoint import fingerprint

    said = ""
    device = "cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu"
    while not stop.is_set():
        try:
            current = client.current_spec()
            local_fp = fingerprint(current.base.path)
            wanted, limit = (None, 0) if config.trainer_only else _span_choice(config, current, device)
            # the memory blocks would use: free accelerator memory on a GPU, available RAM on a CPU
            memory = torch.cuda.mem_get_info()[0] if device == "cuda" else psutil.virtual_memory().available
            spec, span, resp = client.join(peer_id, [], local_fp, 0.0, device, memory,
                                           preferred_span=wanted, max_blocks=limit, quantize=config.quantize,
                                           trainer_only=config.trainer_only)  # fmt: skip
            return spec, span, resp, local_fp
        except JoinRejectedError as exc:
            if not exc.retriable:
                raise
            message = f"waiting for the next round at {config.coordinator} ({exc})"
            if message != said:
                log.info(message)
                said = message
        except grpc.RpcError as exc:
            retriable = {
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            }
            if exc.code() not in retriable:
                raise ValueError(f"the coordinator refused the join: {exc.code().name}: {exc.details()}") from None
            message = f"waiting for an open round at {config.coordinator} ({exc.code().name}: {exc.details()})"
            if message != said:
                log.info(message)
                said = message
        stop.wait(period)
    return None
