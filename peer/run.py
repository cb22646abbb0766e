"""Start a peer from its config: get the round (file or coordinator), run the daemon, follow round changes."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import psutil
import torch
from hivemind.p2p import P2P, PeerID
from hivemind.utils.logging import get_logger

from peer.config import PeerConfig
from peer.daemon import PeerDaemon
from swarm.config import RoundSpec

log = get_logger(__name__)


def run_peer(config: PeerConfig) -> None:
    """Blocking: serve (and train) until SIGTERM/SIGINT; always leaves the DHT and stops p2pd."""
    if config.coordinator:
        _run_with_coordinator(config)
        return
    if not config.round_spec:
        raise ValueError("no round: pass --round-spec FILE or --coordinator HOST:PORT")
    _run_round(PeerDaemon(config, RoundSpec.load(config.round_spec)))


def _run_round(daemon: PeerDaemon, on_start: object = None) -> None:
    daemon.install_signal_handlers()
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


def _run_with_coordinator(config: PeerConfig) -> None:
    from peer.coordinator_client import CoordinatorClient
    from peer.coordinator_link import CoordinatorLink
    from swarm.checkpoint import fingerprint

    if not config.coordinator_public_key:
        raise ValueError("--coordinator needs --coordinator-public-key FILE to verify the adapters it publishes")
    identity, peer_id = _identity(config)
    client = CoordinatorClient(config.coordinator, config.join_token)
    stop = threading.Event()
    try:
        while not stop.is_set():
            current = client.current_spec()
            local_fp = fingerprint(current.base.path)
            device = "cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu"
            spec, span, resp = client.join(peer_id, [], local_fp, 0.0, device, psutil.virtual_memory().available)
            log.info(f"Joined round {spec.round_id} as {peer_id}: span {span.name}")
            link = CoordinatorLink(client, config, peer_id, spec, local_fp)
            initial = link.parent_state()
            peer_config = config.model_copy(
                update={
                    "span": span,
                    "identity_path": identity,
                    "initial_peers": tuple(resp.dht_initial_peers) + tuple(config.initial_peers),
                }
            )
            daemon = PeerDaemon(peer_config, spec, initial_state=initial)
            link.attach(daemon, resp.heartbeat_interval_s or 2.0)
            _run_round(daemon, on_start=link.start)
            link.stop()
            if daemon.stop_event.is_set() and not daemon.round_over.is_set():
                stop.set()  # a signal, not a round change
                try:
                    client.leave(peer_id, spec.round_id)
                except Exception as exc:  # leaving is a courtesy: the heartbeat timeout covers it
                    log.warning(f"could not tell the coordinator we leave: {exc}")
            elif link.action == "stop":
                stop.set()
    finally:
        client.close()
