"""Every option and argument of ``swarm adapters ...`` and ``swarm coordinator`` is documented."""

from __future__ import annotations

from typing import Any

import pytest
import typer

from coordinator.finalize import Outcome
from coordinator.metrics import FINALIZE_OUTCOMES
from swarm.cli import build_app

pytestmark = pytest.mark.timeout(30)


def test_every_parameter_has_help() -> None:
    root: Any = typer.main.get_command(build_app())
    ctx = root.context_class(root)
    adapters = root.get_command(ctx, "adapters")
    commands = {f"adapters {n}": adapters.get_command(ctx, n) for n in ("list", "pull", "merge", "verify")}
    commands["coordinator"] = root.get_command(ctx, "coordinator")
    for name, command in commands.items():
        assert command is not None and command.help, name
        for param in command.params:
            assert getattr(param, "help", None), f"{name}: {param.name} has no help text"
    names = {o for p in commands["coordinator"].params for o in [*p.opts, *p.secondary_opts]}
    assert {"--rounds", "--finalize-timeout", "--signing-key", "--no-dht", "--dht-host-maddrs",
            "--dht-initial-peers"} <= names  # fmt: skip


def test_metric_outcome_labels_match_the_finalize_outcomes() -> None:
    assert set(FINALIZE_OUTCOMES) == {o.value for o in Outcome}
