"""``swarm demo``: a whole round on 127.0.0.1 — tiny base, 3 peers over hivemind, a signed community adapter."""

from __future__ import annotations

import json
import signal
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


class _Peer:
    def __init__(self, workdir: Path, name: str, spec: Path, args: list[str]):
        self.dir = workdir / "peers" / name
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in ("events.jsonl",):
            (self.dir / stale).unlink(missing_ok=True)
        self.events_path, self.ckpt = self.dir / "events.jsonl", self.dir / "ckpt"
        self.log = open(self.dir / "log.txt", "w")  # noqa: SIM115 (closed in stop)
        cmd = [sys.executable, "-m", "swarm.cli", "peer", "--round-spec", str(spec), "--host-maddrs",
               "/ip4/127.0.0.1/tcp/0", "--device", "cpu", "--threads", "1", "--events-file", str(self.events_path),
               "--checkpoint-dir", str(self.ckpt), "--announce-period", "1", *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in _events(self.events_path) if e["event"] == kind]

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"peer exited with {self.proc.returncode}; see {self.dir / 'log.txt'}")
            ready = self.events("ready")
            if ready:
                return ready[0]
            time.sleep(0.2)
        raise TimeoutError(f"peer not ready after {timeout:.0f} s; see {self.dir / 'log.txt'}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


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

    from swarm.adapter import AdapterInfo, Contributor, verify_adapter, write_adapter
    from swarm.adapter_tensors import merge_span_states
    from swarm.basemodel import make_base
    from swarm.checkpoint import fingerprint, read_config
    from swarm.config import BaseModelRef, DataSettings, EndCondition, OptimizerSettings, RoundSpec, split_even
    from swarm.corpus import generate, write_jsonl
    from swarm.keys import load_or_create_signing_key, write_public_key

    workdir = workdir.resolve()
    typer.echo(f"[1/5] base model under {workdir / 'base'} (cached after the first run)")
    base = make_base(workdir / "base", progress=True)
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    write_jsonl(generate("finetune", 800, seed=1), data / "train.jsonl")
    write_jsonl(generate("finetune", 120, seed=2), data / "eval.jsonl")
    layers = int(read_config(base).num_hidden_layers)
    spec = RoundSpec(
        round_id="demo-r1", base=BaseModelRef(path=str(base), fingerprint=fingerprint(base), num_layers=layers),
        spans=split_even(layers, 2),
        data=DataSettings(train_path=str(data / "train.jsonl"), eval_path=str(data / "eval.jsonl"), seq_len=64,
                          micro_batch_size=8),
        optimizer=OptimizerSettings(lr=3e-3, target_batch_size=target_batch_size, matchmaking_time=3.0),
        end=EndCondition(target_epochs=epochs),
    )
    spec_path = workdir / "round.json"
    spec.save(spec_path)

    typer.echo("[2/5] starting 3 peers on 127.0.0.1: a server of span 0, then a trainer on each span")
    peers: list[_Peer] = []
    started = time.monotonic()
    try:
        peers.append(_Peer(workdir, "peer0", spec_path, ["--span-index", "0"]))
        boot = ["--initial-peers", peers[0].wait_ready(180)["maddrs"][0]]
        for i in (0, 1):
            args = ["--span-index", str(i), "--data", str(data / "train.jsonl"), "--shard-index", str(i),
                    "--num-shards", "2", *boot]
            peers.append(_Peer(workdir, f"trainer{i}", spec_path, args))
        for p in peers[1:]:
            p.wait_ready(180)
        typer.echo(f"[3/5] training: {len(spec.spans)} spans, target {epochs} epochs x {target_batch_size} samples")
        trainers = peers[1:]
        with tqdm(total=epochs, desc="epochs", unit="epoch") as bar:
            while not all(len(t.events("eval")) >= 2 for t in trainers):
                if time.monotonic() - started > timeout:
                    raise TimeoutError(f"the round did not finish within {timeout:.0f} s")
                if any(p.proc.poll() is not None for p in peers):
                    raise RuntimeError("a peer died; see the logs under " + str(workdir / "peers"))
                done = min(max((e["epoch"] for e in t.events("epoch")), default=0) for t in trainers)
                bar.update(max(0, min(done, epochs) - bar.n))
                time.sleep(0.5)
            bar.update(epochs - bar.n)
    except KeyboardInterrupt:
        typer.echo("interrupted: stopping peers")
        raise typer.Exit(130) from None
    finally:
        for p in peers:
            p.stop()

    typer.echo("[4/5] assembling the span states into a signed community adapter")
    from safetensors.torch import load_file

    states = []
    for t in peers[1:]:
        last = sorted(t.ckpt.glob("span*_epoch*.safetensors"))[-1]
        states.append(load_file(str(last)))
    tensors = merge_span_states(states, list(spec.spans))
    key_path = workdir / "coordinator" / "signing_key"
    key = load_or_create_signing_key(key_path)
    public = write_public_key(key, workdir / "coordinator" / "public_key.pem")
    version = f"v{len(list((workdir / 'adapters').glob('v*'))) + 1}" if (workdir / "adapters").exists() else "v1"
    out = workdir / "adapters" / version
    evals = [t.events("eval") for t in peers[1:]]
    write_adapter(out, tensors, spec.lora, AdapterInfo(
        version=version, parent_version=None, round_id=spec.round_id, base_model=str(base),
        base_fingerprint=spec.base.fingerprint,
        contributors=[
            Contributor(peer_id=t.events("ready")[0]["peer_id"], samples=e[-1]["samples"],
                        tokens=e[-1]["samples"] * spec.data.seq_len)
            for t, e in zip(peers[1:], evals, strict=True)
        ],
        eval_loss_before=evals[0][0]["loss"], eval_loss_after=evals[0][-1]["loss"],
    ), key)
    verify_adapter(out, public)

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
    typer.echo(f"peers: {len(peers)} ({', '.join(p.dir.name for p in peers)}), spans: "
               f"{', '.join(s.name for s in spec.spans)}, samples: {epochs * target_batch_size}+")
    typer.echo(f"held-out loss: base {base_loss:.4f} -> community adapter {adapter_loss:.4f} "
               f"({100 * (1 - adapter_loss / base_loss):.1f}% lower)")
    typer.echo(f"adapter: {out} (signed; verify with `swarm adapters verify {out} --public-key "
               f"{workdir / 'coordinator' / 'public_key.pem'}`)")
    typer.echo("load it with PEFT:\n" + LOAD_SNIPPET.format(base=base, adapter=out))
    typer.echo(f"took {time.monotonic() - started:.0f} s")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
