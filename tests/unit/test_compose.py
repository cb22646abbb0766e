"""docker-compose.yml stays honest: real CLI invocations, existing mounts, ports that agree with Prometheus.

No Docker engine is needed: each command is parsed by the real ``swarm`` CLI (click's make_context,
so unknown flags, bad values and missing files fail), with every bind-mounted container path mapped
back to the file in this repository.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.main import get_command

from swarm.cli import build_app
from swarm.config import RoundSpec

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
PROMETHEUS = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
OUR_IMAGE = {name for name, s in SERVICES.items() if "build" in s}


def _binds(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of the service's bind mounts (named volumes left out)."""
    out = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        if source.startswith(("./", "/", "../")):
            out[target] = (REPO / source).resolve()
        else:
            assert source in COMPOSE.get("volumes", {}), f"named volume {source!r} is not declared under volumes:"
    return out


def _host_args(service: dict[str, Any]) -> list[str]:
    """The command with bind-mounted container paths replaced by their files in the repository."""
    binds = sorted(_binds(service).items(), key=lambda kv: -len(kv[0]))
    out = []
    for arg in map(str, service["command"]):
        for target, source in binds:
            arg = re.sub(rf"(^|=){re.escape(target)}(?=/|$)", rf"\g<1>{source}", arg)
        out.append(arg)
    return out


def _parse(args: list[str]) -> dict[str, Any]:
    """Parse ``swarm ARGS`` like the real entry point (raises click's UsageError on a bad invocation)."""
    group = get_command(build_app())
    root = type(group).context_class(group, info_name="swarm")
    sub = group.get_command(root, args[0])  # type: ignore[attr-defined]
    assert sub is not None, f"swarm has no command {args[0]!r}"
    return dict(sub.make_context(args[0], args[1:], parent=root).params)


def _flag(service: dict[str, Any], name: str) -> str | None:
    for arg in service.get("command", []):
        if str(arg).startswith(f"{name}="):
            return str(arg).split("=", 1)[1]
    return None


def test_every_swarm_command_parses() -> None:
    assert {"coordinator", "prometheus", "grafana"} <= set(SERVICES)
    peers = [n for n in OUR_IMAGE if SERVICES[n]["command"][0] == "peer"]
    assert len(peers) >= 2, "the demo needs two or more peers"
    for name in sorted(OUR_IMAGE):
        service = SERVICES[name]
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        params = _parse(_host_args(service))
        assert params, name
    coordinator = _parse(_host_args(SERVICES["coordinator"]))
    assert coordinator["host"] == "0.0.0.0" and coordinator["round_spec"] is not None
    for name in peers:
        params = _parse(_host_args(SERVICES[name]))
        assert params["coordinator"] == f"coordinator:{coordinator['port']}", name
        assert params["metrics_host"] == "0.0.0.0" and params["metrics_port"] > 0, name


def test_bad_invocations_are_caught() -> None:
    """The parse above is strict: an unknown flag, a bad value or a missing file fails."""
    from typer._click.exceptions import UsageError  # the click that typer's commands use

    for args in (["peer", "--no-such-flag"], ["coordinator", "--port=abc"], ["coordinator", "--round-spec=/nope.json"]):
        with pytest.raises(UsageError):
            _parse(args)


def test_every_mounted_file_exists() -> None:
    for name, service in SERVICES.items():
        for target, source in _binds(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"
    for name in OUR_IMAGE:  # every path a command names lies on one of the service's volumes
        service = SERVICES[name]
        targets = [spec.split(":")[1] for spec in service.get("volumes", [])]
        for arg in map(str, service["command"]):
            path = arg.split("=", 1)[-1]
            if path.startswith("/") and not path.startswith(("/ip4/", "/ip6/", "/dns")):
                assert any(path == t or path.startswith(t.rstrip("/") + "/") for t in targets), f"{name}: {arg}"
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), f"deploy/Dockerfile copies {src}, which does not exist"
    assert "ARG BASE_IMAGE=" in dockerfile and "FROM ${BASE_IMAGE}" in dockerfile, "the CUDA build argument"


def test_round_spec_matches_what_the_init_services_write() -> None:
    spec = RoundSpec.load(_binds(SERVICES["coordinator"])["/config/round.json"])
    assert spec.base.path == SERVICES["base-model"]["command"][1]
    data_dir = SERVICES["data"]["command"][1]
    assert spec.data.train_path.startswith(data_dir + "/") and spec.data.eval_path.startswith(data_dir + "/")
    layers = SERVICES["base-model"]["command"][SERVICES["base-model"]["command"].index("--layers") + 1]
    assert spec.base.num_layers == int(layers)
    for name in OUR_IMAGE:
        if SERVICES[name]["command"][0] == "peer":
            assert _flag(SERVICES[name], "--data") == spec.data.train_path
            if _flag(SERVICES[name], "--data"):  # a coordinated peer reads only the data files it is given
                assert _flag(SERVICES[name], "--eval-data") == spec.data.eval_path


def _listen_ports(name: str) -> set[int]:
    service = SERVICES[name]
    if name == "prometheus":
        return {int((_flag(service, "--web.listen-address") or ":9090").rsplit(":", 1)[1])}
    if name == "grafana":
        return {3000}
    params = _parse(_host_args(service))
    return {params[k] for k in ("port", "metrics_port") if params.get(k)}


def test_ports_agree_with_prometheus_and_grafana() -> None:
    scraped: dict[str, set[int]] = {}
    jobs = {j["job_name"]: j for j in PROMETHEUS["scrape_configs"]}
    for job in jobs.values():
        for group in job.get("static_configs", []):
            for target in group["targets"]:
                host, port = target.rsplit(":", 1)
                assert host in SERVICES, f"Prometheus scrapes {target}: no compose service {host!r}"
                assert _flag(SERVICES[host], "--metrics-port") == port, f"{host} serves /metrics elsewhere than {port}"
                scraped.setdefault(host, set()).add(int(port))
    exporters = {n for n in OUR_IMAGE if _flag(SERVICES[n], "--metrics-port")}
    assert set(scraped) == exporters, f"scraped {sorted(scraped)} but metrics come from {sorted(exporters)}"
    assert {"coordinator:9400"} == set(jobs["swarm-coordinator"]["static_configs"][0]["targets"])
    for name, service in SERVICES.items():
        for mapping in service.get("ports", []):
            container = int(str(mapping).split(":")[-1].split("/")[0])
            assert container in _listen_ports(name), f"{name} publishes {mapping} but listens on {_listen_ports(name)}"
    prom = SERVICES["prometheus"]
    config = _flag(prom, "--config.file")
    assert config is not None and (REPO / "deploy" / "prometheus" / Path(config).name).is_file()
    assert Path(config).parent.as_posix() in _binds(prom), "the config directory must be mounted"
    for rule_file in PROMETHEUS["rule_files"]:
        assert (REPO / "deploy" / "prometheus" / rule_file).is_file()
    grafana_dir = REPO / "deploy" / "grafana" / "provisioning"
    datasource = yaml.safe_load((grafana_dir / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert datasource["url"] == f"http://prometheus:{next(iter(_listen_ports('prometheus')))}"
    provider = yaml.safe_load((grafana_dir / "dashboards" / "loraswarm.yml").read_text())["providers"][0]
    grafana_binds = _binds(SERVICES["grafana"])
    assert grafana_binds[provider["options"]["path"]] == REPO / "deploy" / "grafana" / "dashboards"
    assert grafana_binds["/etc/grafana/provisioning"] == grafana_dir
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (REPO / "deploy" / "grafana" / "dashboards" / Path(home).name).is_file()


def test_compose_file_documents_ports_and_volumes() -> None:
    header = (REPO / "docker-compose.yml").read_text().split("\nx-swarm:")[0]
    for name, service in SERVICES.items():
        for mapping in service.get("ports", []):
            assert str(mapping).strip('"') in header, f"port {mapping} of {name} is not documented in the header"
    for volume in COMPOSE["volumes"]:
        assert volume in header, f"volume {volume} is not documented in the header"


def test_secrets_stay_with_the_coordinator_and_grafana_needs_a_password() -> None:
    """The coordinator's WORKDIR holds its signing and TLS keys: no other container mounts it. Peers get
    the public files through --public-dir, and pin the certificate found beside the public key."""
    coordinator = _parse(_host_args(SERVICES["coordinator"]))
    workdir_volume = next(v.split(":")[0] for v in SERVICES["coordinator"]["volumes"] if v.split(":")[1] == "/data")
    assert str(coordinator["workdir"]) == "/data" and coordinator["insecure"] is False
    for name, service in SERVICES.items():
        if name != "coordinator":
            assert workdir_volume not in [v.split(":")[0] for v in service.get("volumes", [])], name
    public = str(coordinator["public_dir"])
    public_volume = next(v.split(":")[0] for v in SERVICES["coordinator"]["volumes"] if v.split(":")[1] == public)
    for name in OUR_IMAGE:
        if SERVICES[name]["command"][0] == "peer":
            key = _flag(SERVICES[name], "--coordinator-public-key")
            mounts = {v.split(":")[1]: v.split(":")[0] for v in SERVICES[name]["volumes"]}
            assert key is not None and mounts[str(Path(key).parent)] == public_volume, name
    env = SERVICES["grafana"]["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false" and "GF_AUTH_ANONYMOUS_ORG_ROLE" not in env
    assert env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?"), "no default password"
