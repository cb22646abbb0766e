"""``swarm coordinator``: run a coordinator until SIGTERM / SIGINT. Wire it with ``register(app)``."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import typer

from coordinator.config import CoordinatorConfig
from coordinator.server import serve
from swarm.cli_config import command_from_model
from swarm.config import RoundSpec


def run(config: CoordinatorConfig) -> None:
    """Serve ``config``, print where, block until SIGTERM or SIGINT, then stop cleanly."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server = serve(config)
        try:
            typer.echo(f"coordinator gRPC listening on {server.address}")
            typer.echo(f"coordinator metrics on {server.metrics_url or '(off)'}")
            typer.echo(f"coordinator public key {server.public_key_path}")
            typer.echo(f"coordinator TLS certificate {server.tls_cert_path or '(none: plaintext, --insecure)'}")
            typer.echo(f"coordinator DHT {' '.join(server.ctx.dht_initial_peers) or '(off)'}")
            typer.echo(f"coordinator state in {config.db_path if config.store == 'sqlite' else '(memory)'}")
            while not stop.wait(1.0):
                pass
            typer.echo("coordinator stopping")
        finally:
            server.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    typer.echo("coordinator stopped")


def register(app: typer.Typer) -> None:
    """Add the ``coordinator`` command to ``app`` (and ``merge`` to the ``swarm adapters`` sub-app)."""
    from coordinator.cli_merge import register_merge

    register_merge()

    def _run(config: CoordinatorConfig) -> None:
        logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        run(config)

    # The options are CoordinatorConfig's fields (swarm.cli_config); a few keep their historical flag names.
    app.command("coordinator")(
        command_from_model(
            CoordinatorConfig,
            _run,
            doc="Run the round coordinator: membership, span assignment, round lifecycle, adapter registry.",
            flags={
                "heartbeat_interval_s": "--heartbeat-interval",
                "heartbeat_timeout_s": "--heartbeat-timeout",
                "sweep_interval_s": "--sweep-interval",
                "finalize_timeout_s": "--finalize-timeout",
                "finalize_poll_s": "--finalize-poll",
                "roster_interval_s": "--roster-interval",
                "challenge_ttl_s": "--challenge-ttl",
                "stop_grace_s": "--stop-grace",
                "http_timeout_s": "--http-timeout",
                "evaluator_ids": "--evaluator-id",
                "tls_hostnames": "--tls-hostname",
                "dht": "--dht/--no-dht",
            },
            parsers={"round_spec": (_load_spec, Path, {"exists": True, "dir_okay": False})},
            converters={"metrics_port": _metrics_port},
            envvars={"join_token": "SWARM_JOIN_TOKEN"},
        )
    )


def _load_spec(path: Path) -> RoundSpec:
    return RoundSpec.load(path)


def _metrics_port(port: int | None) -> int | None:
    """-1 turns the metrics server off."""
    return None if port is None or port < 0 else port
