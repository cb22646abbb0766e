"""CoordinatorConfig validation and the `coordinator` CLI command's options (no server started)."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from pydantic import ValidationError
from typer.testing import CliRunner

from coordinator.cli import register
from coordinator.config import CoordinatorConfig
from swarm import software_compatible

pytestmark = pytest.mark.timeout(30)


def test_config_defaults_and_paths(tmp_path: Path) -> None:
    c = CoordinatorConfig(workdir=tmp_path)
    assert c.db_path == tmp_path / "coordinator" / "state.sqlite3"
    assert c.max_message_bytes == 64 << 20 and c.effective_sweep_interval_s == 5.0
    assert CoordinatorConfig(heartbeat_interval_s=0.1, heartbeat_timeout_s=0.4).effective_sweep_interval_s == 0.1
    for name, field in CoordinatorConfig.model_fields.items():
        assert field.description, f"CoordinatorConfig.{name} needs a description"


@pytest.mark.parametrize(
    ("kw", "message"),
    [({"heartbeat_timeout_s": 5, "heartbeat_interval_s": 5}, "must exceed heartbeat_interval_s"),
     ({"port": 70000}, "port"), ({"max_message_mb": 0}, "max_message_mb"), ({"store": "redis"}, "store"),
     ({"max_message_mb": 1, "download_chunk_bytes": 1 << 20}, "download_chunk_bytes"), ({"typo": 1}, "typo")],
)  # fmt: skip
def test_config_rejects_bad_values(kw: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        CoordinatorConfig(**kw)


def test_software_compatibility() -> None:
    assert software_compatible("0.1.9", "0.1.0") and software_compatible("0.1", "0.1.0")
    assert not software_compatible("0.2.0", "0.1.0") and not software_compatible("", "0.1.0")
    assert not software_compatible("1", "1.0.0")


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """Test entry point."""

    register(app)
    return app


def test_cli_help_documents_every_option() -> None:
    result = CliRunner().invoke(_app(), ["coordinator", "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    for option in ["--host", "--port", "--metrics-port", "--workdir", "--round-spec", "--join-token",
                   "--heartbeat-interval", "--heartbeat-timeout", "--max-message-mb", "--log-level"]:  # fmt: skip
        assert option in result.output
    assert "state.sqlite3" in result.output and "0 = pick a free port" in result.output


def test_cli_invalid_settings_exit_2(tmp_path: Path) -> None:
    args = ["coordinator", "--workdir", str(tmp_path), "--heartbeat-timeout", "1", "--heartbeat-interval", "2"]
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 2 and "must exceed heartbeat_interval_s" in result.output
