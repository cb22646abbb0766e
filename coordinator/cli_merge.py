"""``swarm adapters merge``: merge published adapters into a new signed version (mounted by coordinator.cli).

It lives in ``coordinator/`` because merging is the coordinator's job (``coordinator.merge``) and
``swarm/`` never imports ``coordinator/``; it is added to :data:`swarm.cli_adapters.adapters_app`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from swarm.cli_adapters import adapters_app, describe_manifest, fail

_registered = False


def merge_command(
    adapters: Annotated[list[Path], typer.Argument(help="Two or more verified adapter directories to merge.")],
    weights: Annotated[str, typer.Option("--weights", "-w", help="Comma-separated weight per adapter, e.g. 0.5,0.5.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory of the new adapter (must not exist).")],
    signing_key: Annotated[
        Path, typer.Option("--signing-key", help="Ed25519 private key (PEM, mode 0600) that signs the result.")
    ],
    method: Annotated[
        str,
        typer.Option(
            "--method",
            "-m",
            help="linear: exact weighted sum (PEFT 'cat', rank = sum of ranks); "
            "ties: TIES on B@A then SVD to the largest input rank (PEFT 'ties_svd').",
        ),
    ] = "linear",
    version: Annotated[
        str, typer.Option("--version", help="Version name of the result (default <A>-<B>-<method>).")
    ] = "",
    density: Annotated[float, typer.Option("--density", help="ties: fraction of each update's entries kept.")] = 0.5,
    public_key: Annotated[
        Path | None,
        typer.Option("--public-key", "-k", help="Key the inputs must be signed with (default: the signing key's)."),
    ] = None,
) -> None:
    """Merge adapters into a new signed adapter listing every input in its parents."""
    from coordinator.merge import MERGE_METHODS, merge_adapter_dirs
    from swarm.adapter import AdapterVerificationError
    from swarm.keys import load_public_key, load_signing_key

    if method not in MERGE_METHODS:
        fail("merge failed", f"--method must be one of {', '.join(MERGE_METHODS)}, got {method!r}")
    try:
        weight_values = [float(w) for w in weights.split(",")]
    except ValueError:
        fail("merge failed", f"--weights must be comma-separated numbers such as 0.5,0.5, got {weights!r}")
    if len(weight_values) != len(adapters):
        fail("merge failed", f"got {len(adapters)} adapters but {len(weight_values)} weights")
    try:
        key = load_signing_key(signing_key)
        pub = load_public_key(public_key) if public_key else key.public_key()
        manifest = merge_adapter_dirs(adapters, weight_values, method, out, signing_key=key, public_key=pub,  # type: ignore[arg-type]
                                      version=version, density=density)  # fmt: skip
    except (AdapterVerificationError, OSError, ValueError) as e:
        fail("merge failed", e)
    typer.echo(f"merged {', '.join(manifest.parents)} into {out}")
    for line in describe_manifest(manifest):
        typer.echo(line)


def register_merge() -> None:
    """Add ``merge`` to the ``swarm adapters`` sub-app (once)."""
    global _registered
    if not _registered:
        adapters_app.command("merge")(merge_command)
        _registered = True
