"""``swarm evaluator``: the operator's evaluator. Wire it with ``register(app)``."""

from __future__ import annotations

import logging
import signal
import threading

import typer

from evaluator.config import EvaluatorConfig


def register(app: typer.Typer) -> None:
    @app.command("evaluator")
    def evaluator_command(
        coordinator: str = typer.Option(..., "--coordinator", help="Coordinator gRPC address HOST:PORT."),
        coordinator_public_key: str = typer.Option(
            ..., "--coordinator-public-key", help="The coordinator's Ed25519 public key (PEM): verifies parents."
        ),
        coordinator_cert: str = typer.Option(
            "", "--coordinator-cert", help="The coordinator's TLS certificate (PEM) to pin ('' = plaintext)."
        ),
        identity_path: str = typer.Option(
            ..., "--identity-path", help="This evaluator's libp2p key file (made if missing)."
        ),
        eval_data: str = typer.Option("", "--eval-data", help="Held-out data ('' = the round spec's)."),
        max_sequences: int = typer.Option(256, "--max-sequences", help="Held-out sequences evaluated."),
        device: str = typer.Option("cpu", "--device", help="torch device."),
        print_peer_id: bool = typer.Option(
            False,
            "--print-peer-id",
            help="Print this evaluator's peer id (for the coordinator's --evaluator-id) and exit.",
        ),
        log_level: str = typer.Option("INFO", help="Python logging level."),
    ) -> None:
        """Evaluate each round's candidate adapter (base + candidate, loaded here) and report to the coordinator."""
        from evaluator.run import Evaluator
        from swarm.identity import load_or_create_identity

        if print_peer_id:
            typer.echo(load_or_create_identity(identity_path).peer_id)
            return
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        config = EvaluatorConfig(coordinator=coordinator, coordinator_public_key=coordinator_public_key,
                                 coordinator_cert=coordinator_cert, identity_path=identity_path, eval_data=eval_data,
                                 max_sequences=max_sequences, device=device)  # fmt: skip
        evaluator = Evaluator(config)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        typer.echo(f"evaluator {evaluator.peer_id} watching {coordinator}")
        try:
            evaluator.run(stop)
        finally:
            evaluator.close()
        typer.echo("evaluator stopped")
