"""``swarm peer``: run the peer daemon."""

from __future__ import annotations

import sys

import typer

from peer.config import PeerConfig

SPAN_HELP = "Blocks to host as START:END (default: from --span-index, the coordinator, or the least-served span)."


def _parse_span(text: str | None) -> dict[str, int] | None:
    if not text:
        return None
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise typer.BadParameter(f"--span must look like START:END, got {text!r}") from None
    return {"start": start, "end": end}


def peer_command(
    round_spec: str = typer.Option("", "--round-spec", help="Round spec JSON file (when no --coordinator)."),
    coordinator: str = typer.Option("", "--coordinator", help="Coordinator gRPC address HOST:PORT."),
    coordinator_public_key: str = typer.Option(
        "", "--coordinator-public-key", help="Coordinator's Ed25519 public key (PEM) that signs adapters."
    ),
    join_token: str = typer.Option("", "--join-token", envvar="SWARM_JOIN_TOKEN", help="Token to join the round."),
    span: str = typer.Option("", "--span", help=SPAN_HELP),
    span_index: int = typer.Option(-1, "--span-index", help="Index of the round's span to host (-1 = automatic)."),
    num_blocks: int = typer.Option(
        0, "--num-blocks", help="Max blocks to host (0 = any on CPU, what fits in free GPU memory)."
    ),
    initial_peers: list[str] = typer.Option([], "--initial-peers", help="Multiaddr of a DHT peer (repeatable)."),
    host_maddrs: list[str] = typer.Option(
        ["/ip4/0.0.0.0/tcp/0"], "--host-maddrs", help="Multiaddr libp2p listens on (repeatable)."
    ),
    announce_maddrs: list[str] = typer.Option([], "--announce-maddrs", help="Multiaddr announced to others."),
    identity_path: str = typer.Option("", "--identity-path", help="libp2p key file; keeps the peer id stable."),
    use_relay: bool = typer.Option(True, "--use-relay/--no-relay", help="Allow libp2p relays (hivemind)."),
    use_auto_relay: bool = typer.Option(False, "--use-auto-relay", help="Find relays automatically behind NAT."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    trainer: bool | None = typer.Option(None, "--trainer/--no-trainer", help="Drive training batches."),
    data: str = typer.Option("", "--data", help="Training text (JSONL/txt/parquet file or directory)."),
    shard_index: int = typer.Option(0, "--shard-index", help="Data shard this trainer reads (0-based)."),
    num_shards: int = typer.Option(1, "--num-shards", help="Number of data shards."),
    min_replicas: int = typer.Option(
        1, "--min-replicas", help="Before training, wait until every span has this many announced servers."
    ),
    max_steps: int = typer.Option(0, "--max-steps", help="Stop training after N micro-batches (0 = round end)."),
    pipeline_depth: int = typer.Option(
        0,
        "--pipeline-depth",
        help="Micro-batches kept in flight through the chain of spans (0 = auto: 2 on a GPU or with --threads 1, "
        "else 1; on CPU, several torch threads per micro-batch and several micro-batches compete for cores).",
    ),
    request_timeout: float = typer.Option(30.0, "--request-timeout", help="Seconds before failing over."),
    announce_period: float = typer.Option(5.0, "--announce-period", help="Seconds between DHT announcements."),
    metrics_port: int = typer.Option(-1, "--metrics-port", help="/metrics and /health port (-1 off, 0 any)."),
    metrics_host: str = typer.Option("127.0.0.1", "--metrics-host", help="Address of the metrics server."),
    threads: int = typer.Option(0, "--threads", help="torch intra-op threads (0 = default)."),
    events_file: str = typer.Option("", "--events-file", help="Append JSON-lines events (ready, eval, epoch)."),
    checkpoint_dir: str = typer.Option("", "--checkpoint-dir", help="Save the span's LoRA after each epoch."),
    eval_batches: int = typer.Option(4, "--eval-batches", help="Held-out micro-batches per evaluation."),
    seed: int = typer.Option(0, "--seed", help="Seed of the trainer's batch order."),
    quantize: str = typer.Option("none", "--quantize", help="Frozen base weights in none, nf4 or int8 (QLoRA)."),
    check: bool = typer.Option(False, "--check", help="Run the self-check, print it and exit (1 if a check fails)."),
    check_json: bool = typer.Option(False, "--json", help="With --check: print JSON instead of a table."),
) -> None:
    """Run a peer: host a span of the base model, train its LoRA with the swarm, serve other trainers."""
    from pydantic import ValidationError

    try:
        config = PeerConfig(
            round_spec=round_spec,
            coordinator=coordinator,
            coordinator_public_key=coordinator_public_key,
            join_token=join_token,
            span=_parse_span(span),
            span_index=span_index,
            num_blocks=num_blocks,
            initial_peers=tuple(initial_peers),
            host_maddrs=tuple(host_maddrs),
            announce_maddrs=tuple(announce_maddrs),
            identity_path=identity_path,
            use_relay=use_relay,
            use_auto_relay=use_auto_relay,
            device=device,
            dtype=dtype,
            trainer=trainer,
            data_path=data,
            shard_index=shard_index,
            num_shards=num_shards,
            min_replicas=min_replicas,
            max_steps=max_steps,
            pipeline_depth=pipeline_depth,
            request_timeout=request_timeout,
            announce_period=announce_period,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            threads=threads,
            ready_file=events_file,
            checkpoint_dir=checkpoint_dir,
            eval_batches=eval_batches,
            seed=seed,
            quantize=quantize,
            check=check,
            check_json=check_json,
        )
    except ValidationError as exc:
        typer.echo(f"error: invalid peer configuration:\n{exc}", err=True)
        raise typer.Exit(2) from None
    if config.check:
        from peer.selfcheck import check as run_checks
        from peer.selfcheck import failures, render_json, render_table

        results = run_checks(config)
        typer.echo(render_json(results) if config.check_json else render_table(results))
        raise typer.Exit(1 if failures(results) else 0)
    from peer.selfcheck import raise_on_local_failures

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
