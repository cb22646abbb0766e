"""``swarm demo``: a whole round on 127.0.0.1 — tiny base, 3 peers over hivemind, a signed community adapter."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import typer

LOAD_SNIPPET = """from transformers import AutoModelForCausalLM
from peft import PeftModel
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "{adapter}")"""


def _events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Proc:
    """A ``swarm`` subcommand in its own process, logging to DIR/log.txt."""

    def __init__(self, folder: Path, args: list[str]):
        self.dir = folder
        self.dir.mkdir(parents=True, exist_ok=True)
        self.events_path, self.ckpt = self.dir / "events.jsonl", self.dir / "ckpt"
        self.events_path.unlink(missing_ok=True)
        self.log = open(self.dir / "log.txt", "w")  # noqa: SIM115 (closed in stop)
        # Own session, so stop() can clean up everything this process forked (hivemind, p2pd) by group id.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "swarm.cli", *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @classmethod
    def peer(cls, workdir: Path, name: str, args: list[str]) -> _Proc:
        folder = workdir / "peers" / name
        return cls(
            folder,
            [
                "peer",
                "--host-maddrs",
                "/ip4/127.0.0.1/tcp/0",
                "--device",
                "cpu",
                "--threads",
                "1",
                "--events-file",
                str(folder / "events.jsonl"),
                "--announce-period",
                "1",
                *args,
            ],
        )

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in _events(self.events_path) if e["event"] == kind]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):  # leftovers of a process that had to be killed
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def _next_version(adapters: Path) -> str:
    existing = [int(p.name[1:]) for p in adapters.glob("v*") if p.name[1:].isdigit()] if adapters.exists() else []
    return f"v{max(existing, default=0) + 1}"


def _wait(predicate: Any, timeout: float, what: str, procs: list[_Proc]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        dead = [p.dir.name for p in procs if p.proc.poll() is not None]
        if dead:
            raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}; see its log.txt")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def _round_state(port: int, cert: Path) -> tuple[str, str]:
    import grpc

    from swarm.proto import coordinator_pb2 as pb
    from swarm.proto import coordinator_pb2_grpc as pb_grpc
    from swarm.tls import channel as tls_channel

    with tls_channel(f"127.0.0.1:{port}", cert, []) as channel:
        try:
            resp = pb_grpc.CoordinatorStub(channel).GetRoundSpec(pb.GetRoundSpecRequest(), timeout=5)
        except grpc.RpcError:
            return "", ""
        return resp.state, resp.reason


def _eval_loss(model: Any, sequences: Any, batch: int = 16) -> float:
    import torch

    total = 0.0
    with torch.no_grad():
        for i in range(0, len(sequences), batch):
            ids = sequences[i : i + batch]
            total += float(model(input_ids=ids, labels=ids).loss) * len(ids)
    return total / len(sequences)


def demo_command(
    workdir: Path = typer.Option(Path("swarm-work"), "--workdir", help="Where base, data, peers and adapters go."),
    epochs: int = typer.Option(8, "--epochs", help="Optimizer epochs of the round (each = target batch size)."),
    target_batch_size: int = typer.Option(32, "--target-batch-size", help="Samples per epoch, swarm-wide."),
    timeout: float = typer.Option(900.0, "--timeout", help="Give up after this many seconds."),
) -> None:
    """Run a whole round on this machine: base model, 3 peers (2 spans), train, assemble, sign, verify, evaluate."""
    import torch
    from tqdm import tqdm

    from swarm.adapter import verify_adapter
    from swarm.basemodel import make_base
    from swarm.checkpoint import fingerprint, read_config
    from swarm.config import BaseModelRef, DataSettings, EndCondition, OptimizerSettings, RoundSpec, split_even
    from swarm.corpus import generate, write_jsonl
    from swarm.keys import load_public_key

    workdir = workdir.resolve()
    typer.echo(f"[1/5] base model under {workdir / 'base'} (cached after the first run)")
    base = make_base(workdir / "base", progress=True)
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    write_jsonl(generate("finetune", 800, seed=1), data / "train.jsonl")
    write_jsonl(generate("finetune", 120, seed=2), data / "eval.jsonl")
    layers = int(read_config(base).num_hidden_layers)
    spec = RoundSpec(
        round_id=f"demo-{int(time.time())}",
        base=BaseModelRef(path=str(base), fingerprint=fingerprint(base), num_layers=layers),
        spans=split_even(layers, 2),
        data=DataSettings(
            train_path=str(data / "train.jsonl"), eval_path=str(data / "eval.jsonl"), seq_len=64, micro_batch_size=8
        ),
        optimizer=OptimizerSettings(lr=3e-3, target_batch_size=target_batch_size, matchmaking_time=3.0),
        end=EndCondition(target_epochs=epochs),
    )
    spec_path = workdir / "round.json"
    spec.save(spec_path)
    version = _next_version(workdir / "adapters")

    from swarm.identity import load_or_create_identity

    evaluator_key = workdir / "evaluator" / "identity.key"
    evaluator_id = load_or_create_identity(evaluator_key).peer_id
    port = _free_port()
    typer.echo(
        f"[2/5] coordinator on 127.0.0.1:{port} (state in {workdir / 'coordinator'}), its evaluator {evaluator_id}"
    )
    procs: list[_Proc] = []
    evaluator: _Proc | None = None
    started = time.monotonic()
    try:
        procs.append(
            _Proc(
                workdir / "coordinator" / "process",
                [
                    "coordinator",
                    "--workdir",
                    str(workdir),
                    "--round-spec",
                    str(spec_path),
                    "--port",
                    str(port),
                    "--metrics-port",
                    "-1",
                    "--rounds",
                    "1",
                    "--heartbeat-interval",
                    "1",
                    "--heartbeat-timeout",
                    "60",
                    "--dht-host-maddrs",
                    "/ip4/127.0.0.1/tcp/0",
                    "--evaluator-id",
                    evaluator_id,
                ],
            )
        )
        public, cert = workdir / "coordinator" / "public_key.pem", workdir / "coordinator" / "tls_cert.pem"
        _wait(lambda: public.exists() and cert.exists(), 120, "the coordinator to start", procs)
        common = ["--coordinator", f"127.0.0.1:{port}", "--coordinator-public-key", str(public)]
        evaluator = _Proc(workdir / "evaluator", ["evaluator", *common, "--coordinator-cert", str(cert),
                                                  "--identity-path", str(evaluator_key)])  # fmt: skip
        typer.echo("[3/5] 3 peers join through the coordinator: a server, then a trainer on each span")
        procs.append(_Proc.peer(workdir, "peer0", [*common, "--no-trainer"]))
        _wait(lambda: procs[1].events("ready"), 180, "the first peer", procs)
        for i in (0, 1):
            procs.append(
                _Proc.peer(
                    workdir,
                    f"trainer{i}",
                    [
                        *common,
                        "--data",
                        str(data / "train.jsonl"),
                        "--eval-data",
                        str(data / "eval.jsonl"),
                        "--shard-index",
                        str(i),
                        "--num-shards",
                        "2",
                    ],
                )
            )
        adapter_dir = workdir / "adapters" / version
        with tqdm(total=epochs, desc="training epochs", unit="epoch") as bar:
            while not adapter_dir.is_dir():
                if time.monotonic() - started > timeout:
                    raise TimeoutError(f"no adapter was published within {timeout:.0f} s")
                dead = [p.dir.name for p in [*procs, evaluator] if p.proc.poll() is not None]
                if dead:
                    raise RuntimeError(f"{', '.join(dead)} exited; see the logs under {workdir}")
                state, reason = _round_state(port, cert)
                if state == "failed":
                    raise RuntimeError(f"the round failed: {reason}")
                trainers = procs[2:]
                # every trainer writes a "step" event when its share of a swarm-wide step is done
                done = min((max((e["step"] + 1 for e in p.events("step")), default=0) for p in trainers), default=0)
                bar.update(max(0, min(done, epochs) - bar.n))
                time.sleep(0.5)
            bar.update(epochs - bar.n)
    except KeyboardInterrupt:
        typer.echo("interrupted: stopping the coordinator and the peers")
        raise typer.Exit(130) from None
    finally:
        if evaluator is not None:
            evaluator.stop()
        for p in reversed(procs):
            p.stop()

    typer.echo(f"[4/5] the coordinator assembled, checked and signed {adapter_dir}")
    manifest = verify_adapter(adapter_dir, load_public_key(public))
    out = adapter_dir

    typer.echo("[5/5] held-out loss with plain transformers + PEFT")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swarm.data import load_texts, pack

    tok = AutoTokenizer.from_pretrained(base)
    held_out = pack(load_texts(data / "eval.jsonl"), tok, 64)
    base_loss = _eval_loss(AutoModelForCausalLM.from_pretrained(base).eval(), held_out)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(out)).eval()
    adapter_loss = _eval_loss(tuned, held_out)
    torch.set_printoptions(precision=4)
    typer.echo("")
    samples = sum(c.samples for c in manifest.contributors)
    typer.echo(
        f"peers: {len(procs) - 1} ({', '.join(p.dir.name for p in procs[1:])}); spans: "
        f"{', '.join(s.name for s in spec.spans)}; samples contributed: {samples} "
        f"by {len(manifest.contributors)} peers"
    )
    typer.echo(
        f"held-out loss measured by the evaluator: {manifest.eval_loss_before:.4f} -> {manifest.eval_loss_after:.4f}"
    )
    typer.echo(
        f"held-out loss: base {base_loss:.4f} -> community adapter {adapter_loss:.4f} "
        f"({100 * (1 - adapter_loss / base_loss):.1f}% lower)"
    )
    typer.echo(
        f"adapter: {out} (signed; verify with `swarm adapters verify {out} --public-key "
        f"{workdir / 'coordinator' / 'public_key.pem'}`)"
    )
    typer.echo("load it with PEFT:\n" + LOAD_SNIPPET.format(base=base, adapter=out))
    typer.echo(f"took {time.monotonic() - started:.0f} s")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
