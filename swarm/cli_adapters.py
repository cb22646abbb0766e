"""``swarm adapters ...``: command-line tools for published adapters and signing keys.

The sub-app is the module-level :data:`adapters_app`; :func:`register` mounts it on the main CLI. To add
a subcommand (``list``, ``pull``, ``merge``...), define a function decorated with
``@adapters_app.command("name")`` in this module or in a module imported before :func:`register` runs.
Commands print results to stdout, errors to stderr, and exit 0 on success and 1 on failure. Modules
that import torch (``swarm.adapter``) are imported inside commands so ``swarm --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import grpc
import typer

from swarm.adapter_client import AdapterDownloadError, list_adapters, pull_adapter
from swarm.adapter_manifest import Manifest
from swarm.keys import generate_signing_key, load_public_key, public_key_fingerprint, write_public_key

adapters_app = typer.Typer(
    name="adapters",
    help="List, pull, verify and merge community adapters; create the coordinator's signing key.",
    no_args_is_help=True,
    add_completion=False,
)


def register(app: typer.Typer) -> None:
    """Mount the ``adapters`` sub-app on the main ``swarm`` CLI."""
    app.add_typer(adapters_app, name="adapters")


def fail(prefix: str, reason: object) -> NoReturn:
    """Print ``<prefix>: <reason>`` to stderr and exit with status 1."""
    typer.echo(f"{prefix}: {reason}", err=True)
    raise typer.Exit(code=1)


def describe_manifest(manifest: Manifest) -> list[str]:
    """Human-readable lines summarising a verified manifest (shared by verify and future list/pull)."""
    contributors = manifest.contributors
    loss_before = "-" if manifest.eval_loss_before is None else f"{manifest.eval_loss_before:.4f}"
    loss_after = "-" if manifest.eval_loss_after is None else f"{manifest.eval_loss_after:.4f}"
    lora = manifest.lora
    return [
        f"version:          {manifest.version}",
        f"parent:           {manifest.parent_version or '-'}",
        f"parents:          {', '.join(manifest.parents) or '-'}",
        f"method:           {manifest.method}",
        f"round:            {manifest.round_id}",
        f"base model:       {manifest.base_model}",
        f"base fingerprint: {manifest.base_fingerprint}",
        f"lora:             rank {lora.rank}, alpha {lora.alpha:g}, targets {', '.join(lora.target_modules)}",
        f"contributors:     {len(contributors)} peer(s), {manifest.total_samples} samples, "
        f"{manifest.total_tokens} tokens",
        f"eval loss:        {loss_before} -> {loss_after}",
        f"created at:       {manifest.created_at}",
    ]


@adapters_app.command("verify")
def verify_command(
    directory: Annotated[
        Path, typer.Argument(help="Adapter directory (adapter_config.json, adapter_model.safetensors, manifest.*).")
    ],
    public_key: Annotated[
        Path, typer.Option("--public-key", "-k", help="PEM Ed25519 public key of the publisher (coordinator).")
    ],
    base_fingerprint: Annotated[
        str,
        typer.Option(
            "--base-fingerprint", help="Also require the adapter to be trained on the base with this fingerprint."
        ),
    ] = "",
    verbose_contributors: Annotated[
        bool, typer.Option("--contributors", help="List every contributor, not only the summary.")
    ] = False,
) -> None:
    """Check an adapter's signature and hashes; print its manifest summary, or the failed check."""
    from swarm.adapter import AdapterVerificationError, BaseModelMismatchError, check_base, verify_adapter

    try:
        key = load_public_key(public_key)
    except (OSError, ValueError) as e:
        fail("verification failed", f"cannot load public key: {e}")
    try:
        manifest = verify_adapter(directory, key)
        if base_fingerprint:
            check_base(manifest, base_fingerprint)
    except (AdapterVerificationError, BaseModelMismatchError, OSError) as e:
        fail("verification failed", e)
    typer.echo(f"adapter {directory} verified (signed by key {public_key_fingerprint(key)})")
    for line in describe_manifest(manifest):
        typer.echo(line)
    if verbose_contributors:
        for c in manifest.contributors:
            typer.echo(f"  {c.peer_id}: {c.samples} samples, {c.tokens} tokens")


@adapters_app.command("keygen")
def keygen_command(
    path: Annotated[
        Path, typer.Argument(help="Where to write the private key (PEM, mode 0600); PATH.pub gets the public key.")
    ],
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite an existing key at PATH (the old one is lost).")
    ] = False,
) -> None:
    """Create an Ed25519 signing key at PATH (mode 0600) and its public key at PATH.pub."""
    try:
        key = generate_signing_key(path, overwrite=force)
        pub_path = path.with_name(path.name + ".pub")
        pub = write_public_key(key, pub_path)
    except (OSError, ValueError) as e:
        fail("keygen failed", e)
    typer.echo(f"private key: {path} (mode 0600, keep it secret)")
    typer.echo(f"public key:  {pub_path}")
    typer.echo(f"fingerprint: {public_key_fingerprint(pub)}")


def _channel(coordinator: str, cert: Path | None) -> grpc.Channel:
    """TLS pinned to ``cert`` (the coordinator's tls_cert.pem); plaintext only without one (an --insecure coordinator)."""
    from swarm.tls import channel

    return channel(coordinator, cert, options=[("grpc.max_receive_message_length", 256 << 20)])


CertOption = Annotated[
    Path | None,
    typer.Option("--coordinator-cert", help="The coordinator's TLS certificate (PEM) to pin; omit only for a "
                 "coordinator run with --insecure.", envvar="SWARM_COORDINATOR_CERT"),
]  # fmt: skip


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@adapters_app.command("list")
def list_command(
    coordinator: Annotated[
        str, typer.Option("--coordinator", "-c", help="Coordinator gRPC address HOST:PORT.", envvar="SWARM_COORDINATOR")
    ],
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the coordinator.")] = 30.0,
    coordinator_cert: CertOption = None,
) -> None:
    """Print the coordinator's adapter registry as a table, oldest first."""
    from datetime import datetime, timezone

    try:
        with _channel(coordinator, coordinator_cert) as channel:
            entries = list_adapters(channel, timeout)
    except grpc.RpcError as e:
        fail("list failed", f"{coordinator}: {e.code().name}: {e.details()}")
    header = f"{'VERSION':<12} {'PARENTS':<16} {'ROUND':<16} {'CREATED (UTC)':<20} {'EVAL BEFORE':>11} {'EVAL AFTER':>10}  SHA256"
    typer.echo(header)
    for a in entries:
        created = datetime.fromtimestamp(a.created_at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        before = a.eval_loss_before if a.HasField("eval_loss_before") else None
        after = a.eval_loss_after if a.HasField("eval_loss_after") else None
        typer.echo(f"{a.version:<12} {','.join(a.parents) or '-':<16} {a.round_id:<16} {created:<20} "
                   f"{_loss(before):>11} {_loss(after):>10}  {a.sha256[:12]}")  # fmt: skip
    if not entries:
        typer.echo("(no adapter published yet)")


@adapters_app.command("pull")
def pull_command(
    version: Annotated[str, typer.Argument(help="Adapter version to download, e.g. v3 ('latest' = the newest).")],
    coordinator: Annotated[
        str, typer.Option("--coordinator", "-c", help="Coordinator gRPC address HOST:PORT.", envvar="SWARM_COORDINATOR")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to create (must not exist or be empty).")],
    public_key: Annotated[
        Path,
        typer.Option("--public-key", "-k", help="PEM Ed25519 public key of the coordinator; checked before keeping."),
    ],
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds the whole download may take.")] = 300.0,
    coordinator_cert: CertOption = None,
) -> None:
    """Download an adapter, verify its signature and hashes, and keep it only if they verify."""
    from swarm.adapter import AdapterVerificationError

    try:
        key = load_public_key(public_key)
    except (OSError, ValueError) as e:
        fail("pull failed", f"cannot load public key: {e}")
    try:
        with _channel(coordinator, coordinator_cert) as channel:
            manifest = pull_adapter(channel, "" if version == "latest" else version, out, key, timeout)
    except grpc.RpcError as e:
        fail("pull failed", f"{coordinator}: {e.code().name}: {e.details()}")
    except (AdapterDownloadError, AdapterVerificationError, OSError) as e:
        fail("pull failed", f"{e} (nothing kept at {out})")
    typer.echo(f"adapter {manifest.version} saved to {out} (verified, signed by key {public_key_fingerprint(key)})")
    for line in describe_manifest(manifest):
        typer.echo(line)
