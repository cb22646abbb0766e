"""``python -m coordinator [OPTIONS]``: the ``swarm coordinator`` command without the rest of the CLI."""

from __future__ import annotations

import typer

from coordinator.cli import register


def main() -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app)  # a single command: typer runs it without a subcommand name
    app()


if __name__ == "__main__":
    main()
