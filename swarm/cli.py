"""The ``swarm`` command: one Typer app composed from each component's ``register`` function.

This module is the composition root: it is the one place that knows about ``peer`` and ``coordinator``,
and it imports them lazily so that ``swarm --help`` stays fast and ``swarm/`` never imports them at import time.
"""

from __future__ import annotations

import importlib

import typer

from swarm import __version__

_COMPONENTS = (
    "swarm.cli_base",
    "swarm.cli_adapters",
    "peer.cli",
    "coordinator.cli",
    "evaluator.cli",
    "swarm.cli_demo",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"loraswarm {__version__}")
        raise typer.Exit()


def build_app() -> typer.Typer:
    app = typer.Typer(
        name="swarm",
        help="Train community LoRA adapters on a volunteer swarm (hivemind DHT + coordinator).",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )

    @app.callback()
    def _root(
        version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    ) -> None:
        """loraswarm command line."""

    for name in _COMPONENTS:
        importlib.import_module(name).register(app)
    return app


def main() -> None:
    build_app()()


if __name__ == "__main__":
    main()
