"""Start a peer from its config: get the round spec, run the daemon until the round ends or a signal."""

from __future__ import annotations

from hivemind.utils.logging import get_logger

from peer.config import PeerConfig
from peer.daemon import PeerDaemon
from swarm.config import RoundSpec

log = get_logger(__name__)


def load_spec(config: PeerConfig) -> RoundSpec:
    if config.round_spec:
        return RoundSpec.load(config.round_spec)
    raise ValueError("no round: pass --round-spec FILE or --coordinator HOST:PORT")


def run_peer(config: PeerConfig) -> None:
    """Blocking: serve (and train) until SIGTERM/SIGINT; always leaves the DHT and stops p2pd."""
    spec = load_spec(config)
    daemon = PeerDaemon(config, spec)
    daemon.install_signal_handlers()
    try:
        daemon.start()
        if config.is_trainer:
            from peer.training_loop import TrainingLoop

            TrainingLoop(daemon).run()
        while not daemon.stop_event.wait(0.5):
            daemon.tick()
    finally:
        daemon.shutdown()
