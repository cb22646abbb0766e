"""The peer's startup self-check: what is wrong, in one line each, with what to do; never a hang.

``local_checks`` reads only this machine (files, keys, the base checkpoint): ``run_peer`` calls it before any network
wait, so a typo fails at once. ``check`` adds the rest: package versions, device and memory against the span
(how many blocks fit, with ``--quantize``), that hivemind's p2pd starts, that the coordinator answers (gRPC
health, then its open round), the coordinator's required version and this machine's clock offset from it, and this
peer's reachability as another peer sees it (the coordinator dials it back: direct / relayed / unreachable, with the
port to forward; :mod:`peer.reachability`). Every network step has a timeout. ``swarm peer --check`` prints
:func:`render_table` (people) or :func:`render_json` (tools).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from peer.config import PeerConfig
from swarm.config import RoundSpec, SpanRange

log = logging.getLogger(__name__)  # stdlib: this module is imported before torch and hivemind on purpose
Status = Literal["ok", "warn", "fail", "skip"]
PACKAGES = ("loraswarm", "torch", "hivemind", "transformers", "peft", "grpcio", "bitsandbytes")
MEMORY_HEADROOM = 0.8  # share of free memory the span's frozen weights may take (LoRA, activations, optimizer)


@dataclass(frozen=True)
class CheckResult:
    """One line of the self-check: ``detail`` says what was found, ``advice`` what to do when not ok."""

    name: str
    status: Status
    detail: str
    advice: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        return f"{self.status.upper()} {self.name}: {self.detail}" + (f" -> {self.advice}" if self.advice else "")


class _Failed(Exception):
    def __init__(self, detail: str, advice: str = "", status: Status = "fail"):
        super().__init__(detail)
        self.detail, self.advice, self.status = detail, advice, status


def _run(name: str, fn: Callable[[], str]) -> CheckResult:
    """Run one check: its return value is the ok detail; ``_Failed`` (or any error) makes a failure line."""
    started = time.perf_counter()
    try:
        status, detail, advice = "ok", fn(), ""
    except _Failed as f:
        status, detail, advice = f.status, f.detail, f.advice
    except Exception as exc:  # an unexpected error is still one line, named, not a traceback
        status, detail, advice = "fail", f"{type(exc).__name__}: {exc}", ""
    return CheckResult(name, status, detail, advice, round(time.perf_counter() - started, 3))  # type: ignore[arg-type]


# --- local checks (no network) ------------------------------------------------------------------------------------
def _round_source(config: PeerConfig) -> str:
    if config.coordinator:
        if not config.coordinator_public_key:
            raise _Failed("--coordinator is given without --coordinator-public-key", "pass the coordinator's PEM key")
        return f"coordinator {config.coordinator}"
    if config.round_spec:
        return f"round spec file {config.round_spec}"
    raise _Failed("no round: pass --round-spec FILE or --coordinator HOST:PORT")


def _coordinator_key(config: PeerConfig) -> str:
    from swarm.keys import load_public_key, public_key_fingerprint

    try:
        pub = load_public_key(config.coordinator_public_key)
    except FileNotFoundError:
        raise _Failed(
            f"--coordinator-public-key {config.coordinator_public_key} does not exist",
            "pass the path of the PEM public key the coordinator's operator publishes",
        ) from None
    except ValueError as exc:
        raise _Failed(str(exc), "pass the coordinator's Ed25519 public key file (PEM)") from None
    return f"Ed25519 key {public_key_fingerprint(pub)[:16]}…"


def _coordinator_tls(config: PeerConfig) -> str:
    if config.coordinator_insecure:
        return "plaintext (--coordinator-insecure: only for a coordinator run with --insecure)"
    try:
        cert = config.coordinator_cert_path
    except ValueError as exc:
        raise _Failed(str(exc)) from None
    if not Path(cert).is_file():
        raise _Failed(f"--coordinator-cert {cert} does not exist", "pass the coordinator's tls_cert.pem")
    return f"TLS, pinned certificate {cert}"


def _round_spec(config: PeerConfig, found: dict[str, RoundSpec]) -> str:
    if not Path(config.round_spec).is_file():
        raise _Failed(f"--round-spec {config.round_spec} does not exist", "pass the round's JSON spec file")
    try:
        found["spec"] = spec = RoundSpec.load(config.round_spec)
    except Exception as exc:  # pydantic / JSON errors name the field
        raise _Failed(f"--round-spec {config.round_spec} is not a valid round spec: {exc}") from None
    return f"round {spec.round_id}: {len(spec.spans)} span(s) over {spec.base.num_layers} blocks"


def _data(config: PeerConfig) -> str:
    for flag, path in (("--data", config.data_path), ("--eval-data", config.eval_data_path)):
        if path and not Path(path).exists():
            raise _Failed(f"{flag} {path} does not exist", "pass a .jsonl/.txt/.parquet file or a directory")
    return ", ".join(p for p in (config.data_path, config.eval_data_path) if p)


def _quantize_backend(config: PeerConfig) -> str:
    try:
        import bitsandbytes
    except ImportError as exc:
        raise _Failed(
            f"--quantize {config.quantize} needs bitsandbytes ({exc})",
            "pip install 'bitsandbytes==0.50.*' or run without --quantize",
        ) from None
    return f"bitsandbytes {bitsandbytes.__version__} for {config.quantize}"


def _base(spec: RoundSpec) -> str:
    from swarm.checkpoint import fingerprint

    path = Path(spec.base.path).expanduser()
    if not path.is_dir():
        looks_hub = spec.base.path.count("/") == 1 and not spec.base.path.startswith((".", "/", "~"))
        if looks_hub:
            raise _Failed(f"{spec.base.path} is a hub id: downloaded at start", status="skip")
        raise _Failed(
            f"base model {spec.base.path} does not exist on this machine",
            "download the round's base model to that path (the round spec names it)",
        )
    if not spec.base.fingerprint:
        return f"{path} (the round names no fingerprint to compare)"
    local = fingerprint(path)
    if local != spec.base.fingerprint:
        raise _Failed(
            f"base model {path} has fingerprint {local[:19]}…, the round expects {spec.base.fingerprint[:19]}…",
            "this is a different model or a different revision: fetch the exact checkpoint the round uses",
        )
    return f"{path} matches the round's fingerprint"


def local_checks(config: PeerConfig) -> tuple[list[CheckResult], RoundSpec | None]:
    """Checks of files and keys on this machine (fast, no network); returns them and the round spec if read."""
    found: dict[str, RoundSpec] = {}
    results = [_run("round", lambda: _round_source(config))]
    if config.coordinator and config.coordinator_public_key:
        results.append(_run("coordinator-key", lambda: _coordinator_key(config)))
        if results[-1].status == "ok":  # the certificate's default place is beside the key: one line at a time
            results.append(_run("coordinator-tls", lambda: _coordinator_tls(config)))
    if not config.coordinator and config.round_spec:
        results.append(_run("round-spec", lambda: _round_spec(config, found)))
    if config.data_path or config.eval_data_path:
        results.append(_run("data", lambda: _data(config)))
    if config.quantize != "none":
        results.append(_run("quantize", lambda: _quantize_backend(config)))
    spec = found.get("spec")
    if spec is not None:
        results.append(_run("base-model", lambda: _base(spec)))
    return results, spec


def failures(results: list[CheckResult]) -> list[CheckResult]:
    return [r for r in results if r.status == "fail"]


def raise_on_local_failures(config: PeerConfig) -> list[CheckResult]:
    """For ``run_peer``: log the local checks; raise ``ValueError`` with one line per failure (no network wait).

    Returns the results (the daemon serves them in ``/health``)."""
    results = local_checks(config)[0]
    for r in results:
        if r.status != "fail":
            log.info(f"self-check: {r.line()}")
    bad = failures(results)
    if bad:
        raise ValueError("\n".join(f"{r.detail}" + (f" ({r.advice})" if r.advice else "") for r in bad))
    return results


# --- environment and network checks -------------------------------------------------------------------------------
def _packages() -> str:
    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} -")
    return ", ".join(found)


def _device(config: PeerConfig) -> str:
    from peer.daemon import resolve_device

    try:
        device, dtype = resolve_device(config.device, config.dtype)
    except ValueError as exc:
        raise _Failed(str(exc), "install a CUDA build of torch, or run with --device cpu") from None
    if device == "cuda":
        import torch

        return f"cuda ({torch.cuda.get_device_name()}), {str(dtype).removeprefix('torch.')}"
    return f"cpu, {str(dtype).removeprefix('torch.')}"


def _free_memory(device: str) -> int:
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    import psutil

    return int(psutil.virtual_memory().available)


def _span_to_host(config: PeerConfig, spec: RoundSpec) -> tuple[SpanRange, str]:
    if config.span is not None:
        return config.span, "--span"
    if 0 <= config.span_index < len(spec.spans):
        return spec.spans[config.span_index], "--span-index"
    return min(spec.spans, key=len), "the round's smallest span"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def memory_check(config: PeerConfig, spec: RoundSpec, free_bytes: int | None = None) -> CheckResult:
    """How many blocks of the round's base fit in ``free_bytes`` (default: free memory of the device now)."""
    return _run("memory", lambda: _memory(config, spec, free_bytes))


def _memory(config: PeerConfig, spec: RoundSpec, free_bytes: int | None) -> str:
    from peer.daemon import resolve_device
    from swarm.quantize import block_nbytes_quantized

    device, dtype = resolve_device(config.device, config.dtype)
    if not Path(spec.base.path).expanduser().is_dir():
        raise _Failed("the base model is not on this machine yet: block sizes unknown", status="skip")
    per_block = block_nbytes_quantized(spec.base.path, 0, config.quantize, dtype.itemsize)
    free = _free_memory(device) if free_bytes is None else free_bytes
    fit = int(free * MEMORY_HEADROOM // per_block)
    span, why = _span_to_host(config, spec)
    detail = (
        f"{_human(free)} free on {device}: {fit} blocks of {_human(per_block)} fit "
        f"({str(dtype).removeprefix('torch.')}, quantize {config.quantize}); {why} {span.name} has {len(span)}"
    )
    if fit < len(span):
        advice = "use --quantize nf4" if config.quantize == "none" else "host fewer blocks (--num-blocks)"
        raise _Failed(detail, f"{advice}, or free memory")
    return detail


def _p2pd(config: PeerConfig, timeout: float) -> str:
    import asyncio

    from hivemind.p2p import P2P

    async def roundtrip() -> str:
        p2p = await P2P.create(host_maddrs=list(config.host_maddrs), startup_timeout=timeout)
        try:
            return f"started and stopped; listens on {', '.join(str(m) for m in await p2p.get_visible_maddrs())}"
        finally:
            await p2p.shutdown()

    try:
        return asyncio.run(asyncio.wait_for(roundtrip(), timeout))
    except asyncio.TimeoutError:
        raise _Failed(f"p2pd did not start within {timeout:.0f} s", "check --host-maddrs and the firewall") from None
    except Exception as exc:
        raise _Failed(
            f"p2pd failed: {exc}", "reinstall hivemind (its wheel ships p2pd); check that --host-maddrs can bind"
        ) from None


def _client(config: PeerConfig, timeout: float) -> Any:
    from peer.coordinator_client import CoordinatorClient
    from swarm.keys import load_public_key

    return CoordinatorClient(
        config.coordinator,
        config.join_token,
        timeout=timeout,
        cert=config.coordinator_cert_path,
        public_key=load_public_key(config.coordinator_public_key),  # the round spec's signature is checked too
    )


def _coordinator(config: PeerConfig, timeout: float, found: dict[str, Any]) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    client = _client(config, timeout)
    try:
        try:
            grpc.channel_ready_future(client.channel).result(timeout=timeout)
            health = health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except (grpc.FutureTimeoutError, grpc.RpcError) as exc:
            raise _Failed(
                f"coordinator {config.coordinator} is unreachable ({type(exc).__name__} after {timeout:.0f} s)",
                "check the address and port, and that the coordinator runs and its port is open",
            ) from None
        if health.status != health_pb2.HealthCheckResponse.SERVING:
            raise _Failed(f"coordinator {config.coordinator} answers but is not serving (shutting down?)")
        found["reachable"] = True
        try:
            found["spec"] = spec = client.current_spec()
        except ValueError as exc:  # a spec whose signature does not verify with --coordinator-public-key
            raise _Failed(str(exc), "check that --coordinator-public-key is this coordinator's key") from None
        except grpc.RpcError as exc:
            raise _Failed(
                f"coordinator {config.coordinator} is up but has no open round ({exc.code().name})",
                "the peer waits for the next round",
                status="warn",
            ) from None
        return f"{config.coordinator} serving; open round {spec.round_id}"
    finally:
        client.close()


CLOCK_WARN_S, CLOCK_FAIL_S = 5.0, 30.0  # DHT records expire by wall clock; rosters older than 120 s are refused


def _clock(config: PeerConfig, timeout: float) -> str:
    """The coordinator's required version, and this machine's clock offset from the coordinator's."""
    import grpc

    from swarm import __version__, software_compatible

    client = _client(config, timeout)
    try:
        offset, rtt, required = client.clock()
    except grpc.RpcError as exc:
        raise _Failed(f"not measured: the coordinator has no round to ask about ({exc.code().name})",
                      status="skip") from None  # fmt: skip
    except ValueError as exc:
        raise _Failed(f"not measured: {exc}", status="skip") from None
    finally:
        client.close()
    if not software_compatible(__version__, required):
        raise _Failed(
            f"the coordinator requires loraswarm {required} (same major.minor); this is {__version__}",
            f"install loraswarm {'.'.join(required.split('.')[:2])}.x",
        )
    detail = f"offset {offset:+.2f} s from the coordinator's clock (+/- {rtt / 2:.2f} s); version {__version__} ok"
    if abs(offset) > CLOCK_WARN_S:
        advice = "synchronise the clock (e.g. timedatectl set-ntp true): DHT records expire by wall clock"
        raise _Failed(detail, advice, status="fail" if abs(offset) > CLOCK_FAIL_S else "warn")
    return detail


def _reachability(config: PeerConfig, timeout: float) -> str:
    """Decide as the daemon would (peer.reachability.decide: the coordinator dials a node of this machine back),
    then, when that means a relay, start a node with its relay slot and ask again: ``relayed``."""
    import grpc

    from peer.reachability import decide, probe

    client = _client(config, timeout)
    try:
        decision = decide(config, client, timeout)
        found = decision.answer
        if decision.reach == "private":
            found = probe(config, client, "private", decision.relays, timeout)
    except grpc.RpcError as exc:
        raise _Failed(f"the coordinator could not check ({exc.code().name}: {exc.details()})", status="skip") from None
    except ValueError as exc:
        raise _Failed(str(exc)) from None
    finally:
        client.close()
    if found is None:
        return f"public (--reachability {config.reach}): not asked"
    if found.reach == "direct":
        return f"direct: {found.detail}"
    raise _Failed(f"{found.reach}: {found.detail}", found.advice, status="warn")


def check(config: PeerConfig, timeout: float = 5.0) -> list[CheckResult]:
    """Every check, local ones first; when one of those fails, the slower ones are skipped (fix that first)."""
    results, spec = local_checks(config)
    if failures(results):
        return results + [CheckResult("others", "skip", "not run: fix the failures above first")]
    results.append(_run("packages", _packages))
    results.append(_run("device", lambda: _device(config)))
    results.append(_run("p2pd", lambda: _p2pd(config, timeout)))
    if config.coordinator:
        found: dict[str, Any] = {}
        results.append(_run("coordinator", lambda: _coordinator(config, timeout, found)))
        spec = found.get("spec")
        if spec is not None:
            results.append(_run("base-model", lambda: _base(spec)))
        if found.get("reachable"):
            results.append(_run("clock", lambda: _clock(config, timeout)))
            results.append(_run("reachability", lambda: _reachability(config, timeout)))
        else:
            results.append(CheckResult("reachability", "skip", "not checked: the coordinator dials back, and it is "
                                       "unreachable"))  # fmt: skip
    if spec is not None:
        results.append(memory_check(config, spec))
    return results


def render_table(results: list[CheckResult]) -> str:
    width = max(len(r.name) for r in results)
    rows = [
        f"{r.status.upper():4}  {r.name:{width}}  {r.detail}"
        + (f"\n      {'':{width}}  -> {r.advice}" if r.advice else "")
        for r in results
    ]
    bad = len(failures(results))
    rows.append(f"{'self-check passed' if not bad else f'self-check failed: {bad} problem(s)'}")
    return "\n".join(rows)


def render_json(results: list[CheckResult]) -> str:
    return json.dumps({"ok": not failures(results), "checks": [asdict(r) for r in results]}, indent=2)
