"""The peer CLI documents every flag and refuses bad configuration with a message naming the field."""

from __future__ import annotations

import pytest
import typer
from pydantic import ValidationError
from typer.testing import CliRunner

from peer.cli import register
from peer.config import PeerConfig


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.command("noop")
    def _noop() -> None:  # a second command keeps "peer" a subcommand
        pass

    return app


def test_every_option_has_help() -> None:
    command = typer.main.get_command(_app()).commands["peer"]  # type: ignore[attr-defined]
    missing = [p.name for p in command.params if not getattr(p, "help", None)]
    assert not missing, f"options without help: {missing}"


def test_bad_span_is_reported() -> None:
    result = CliRunner().invoke(_app(), ["peer", "--span", "3-7"])
    assert result.exit_code != 0
    assert "--span must look like START:END" in result.output


def test_no_round_given() -> None:
    result = CliRunner().invoke(_app(), ["peer"])
    assert result.exit_code == 2
    assert "no round: pass --round-spec FILE or --coordinator HOST:PORT" in result.output


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("request_timeout", 0, "must be > 0"),
        ("num_shards", -1, "must be >= 0"),
        ("device", "tpu", "Input should be 'auto', 'cpu' or 'cuda'"),
    ],
)
def test_config_validation(field: str, value: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as info:
        PeerConfig(**{field: value})
    assert field in str(info.value)
