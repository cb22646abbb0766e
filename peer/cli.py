"""``swarm peer``: run the peer daemon."""

from __future__ import annotations

import sys

import typer

from peer.config import PeerConfig
from swarm.cli_config import command_from_model


def _parse_span(text: str | None) -> dict[str, int] | None:
    if not text:
        return None
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise typer.BadParameter(f"--span must look like START:END, got {text!r}") from None
    return {"start": start, "end": end}


def _run(config: PeerConfig) -> None:
    from peer.selfcheck import check as run_checks
    from peer.selfcheck import failures, raise_on_local_failures, render_json, render_table

    if config.check:
        results = run_checks(config)
        typer.echo(render_json(results) if config.check_json else render_table(results))
        raise typer.Exit(1 if failures(results) else 0)
    try:  # before the heavy imports below: a wrong path or key fails in a second, not after torch loads
        raise_on_local_failures(config)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    from hivemind.utils.logging import use_hivemind_log_handler

    from peer.run import run_peer

    use_hivemind_log_handler("in_root_logger")  # the peer's own INFO messages, in hivemind's format
    try:
        run_peer(config)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    _exit_after_shutdown()


#: ``swarm peer``: its options are PeerConfig's fields (swarm.cli_config); a few keep their historical names.
peer_command = command_from_model(
    PeerConfig,
    _run,
    doc="Run a peer: host a span of the base model, train its LoRA with the swarm, serve other trainers.",
    flags={
        "data_path": "--data",
        "eval_data_path": "--eval-data",
        "use_relay": "--use-relay/--no-relay",
        "host_maddrs": "--host-maddrs",
        "check_json": "--json",
    },
    parsers={"span": _parse_span},
    envvars={"join_token": "SWARM_JOIN_TOKEN"},
)


def _exit_after_shutdown(grace: float = 3.0) -> None:
    """Everything is shut down by now: leave without interpreter finalization.

    Native thread pools (torch, grpc, libp2p bindings) can abort the process while Python finalizes
    ("terminate called without an active exception"), and a library thread that is not a daemon must not keep
    the process alive. The tests check that no process of the peer's group survives this exit.
    """
    import logging
    import os
    import threading

    stray = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    for thread in stray:
        thread.join(timeout=grace / max(len(stray), 1))
    alive = [t.name for t in stray if t.is_alive()]
    if alive:
        logging.getLogger(__name__).warning(f"exiting although threads {alive} are still running")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def register(app: typer.Typer) -> None:
    app.command("peer")(peer_command)
