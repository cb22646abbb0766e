"""``swarm coordinator``: run a coordinator until SIGTERM / SIGINT. Wire it with ``register(app)``."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import typer

from coordinator.config import CoordinatorConfig
from coordinator.server import serve
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

    @app.command("coordinator")
    def coordinator(
        host: str = typer.Option("127.0.0.1", help="Interface to listen on for gRPC and metrics (0.0.0.0 = all)."),
        port: int = typer.Option(50051, help="gRPC port (0 = pick a free port; the bound one is printed)."),
        metrics_port: int = typer.Option(
            9400, help="HTTP port of /metrics and /health (0 = pick a free port, -1 = no metrics server)."
        ),
        workdir: Path = typer.Option(
            Path("swarm-work"), help="Working directory; state goes to WORKDIR/coordinator/state.sqlite3."
        ),
        round_spec: Path | None = typer.Option(
            None, exists=True, dir_okay=False, help="RoundSpec JSON file: the round to open when none is open."
        ),
        join_token: str = typer.Option(
            "", envvar="SWARM_JOIN_TOKEN", help="Secret peers must present to join ('' = anyone may join)."
        ),
        heartbeat_interval: float = typer.Option(5.0, help="Seconds between heartbeats that peers are asked for."),
        heartbeat_timeout: float = typer.Option(
            30.0, help="Seconds without a heartbeat after which a peer is dropped and its span rebalanced."
        ),
        max_message_mb: float = typer.Option(
            64.0, help="Largest gRPC message accepted, in MiB (span-state uploads must fit)."
        ),
        rounds: int = typer.Option(
            1,
            help="Rounds to run from --round-spec; each next one starts from the adapter just published (0 = no limit).",
        ),
        finalize_timeout: float = typer.Option(
            600.0, help="Seconds a finalizing round waits for span uploads and final evals before giving up."
        ),
        signing_key: Path | None = typer.Option(
            None,
            dir_okay=False,
            help="Ed25519 key that signs adapters (default WORKDIR/coordinator/signing_key, made if missing).",
        ),
        dht: bool = typer.Option(True, "--dht/--no-dht", help="Run a DHT node and publish the signed roster in it."),
        dht_host_maddrs: list[str] = typer.Option(
            [], "--dht-host-maddrs", help="Multiaddr the DHT node listens on; repeatable (default /ip4/HOST/tcp/0)."
        ),
        dht_announce_maddrs: list[str] = typer.Option(
            [], "--dht-announce-maddrs", help="Multiaddr announced to peers (e.g. a public address); repeatable."
        ),
        dht_initial_peers: list[str] = typer.Option(
            [], "--dht-initial-peers", help="Multiaddr of a DHT node to join (default: start a new DHT); repeatable."
        ),
        public_dir: Path | None = typer.Option(
            None,
            file_okay=False,
            help="Directory to copy public_key.pem and tls_cert.pem into, for peers "
            "(e.g. a volume shared with them; the private keys stay in WORKDIR).",
        ),
        evaluator_id: list[str] = typer.Option(
            [],
            "--evaluator-id",
            help="Peer id of an evaluator you run (swarm evaluator); repeatable. With one, "
            "evaluators alone gate publication; without, a quorum of members does.",
        ),
        insecure: bool = typer.Option(
            False,
            "--insecure",
            help="Serve gRPC in plaintext (local demos and tests only: credentials travel in clear).",
        ),
        tls_cert: Path | None = typer.Option(
            None,
            dir_okay=False,
            help="PEM certificate of the gRPC port (default WORKDIR/coordinator/tls_cert.pem, made "
            "if missing): hand it to peers, who pin it.",
        ),
        tls_key: Path | None = typer.Option(None, dir_okay=False, help="PEM private key of --tls-cert."),
        tls_hostname: list[str] = typer.Option(
            [], "--tls-hostname", help="Name or IP put in a generated certificate (repeatable)."
        ),
        log_level: str = typer.Option("INFO", help="Python logging level: DEBUG, INFO, WARNING, ERROR."),
    ) -> None:
        """Run the round coordinator: membership, span assignment, round lifecycle, adapter registry."""
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            config = CoordinatorConfig(
                host=host,
                port=port,
                metrics_port=None if metrics_port < 0 else metrics_port,
                workdir=workdir,
                round_spec=RoundSpec.load(round_spec) if round_spec else None,
                join_token=join_token,
                heartbeat_interval_s=heartbeat_interval,
                heartbeat_timeout_s=heartbeat_timeout,
                max_message_mb=max_message_mb,
                rounds=rounds,
                finalize_timeout_s=finalize_timeout,
                signing_key=signing_key,
                dht=dht,
                dht_host_maddrs=tuple(dht_host_maddrs),
                dht_announce_maddrs=tuple(dht_announce_maddrs),
                dht_initial_peers=tuple(dht_initial_peers),
                insecure=insecure,
                public_dir=public_dir,
                evaluator_ids=tuple(evaluator_id),
                tls_cert=tls_cert,
                tls_key=tls_key,
                tls_hostnames=tuple(tls_hostname),
            )
        except ValueError as e:  # pydantic's ValidationError is a ValueError; its text names each field
            typer.echo(f"invalid coordinator settings: {e}", err=True)
            raise typer.Exit(2) from None
        run(config)
