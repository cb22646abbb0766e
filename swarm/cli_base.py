"""CLI commands that build the demo base model and the finetune data: ``make-base`` and ``make-data``.

Attach them to a Typer app with :func:`register`. Heavy imports (torch, transformers) happen
inside the commands so that ``--help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

from swarm.arch import SUPPORTED_ARCHITECTURES

_ARCHS = ", ".join(sorted(SUPPORTED_ARCHITECTURES))


def make_base_command(
    out_dir: Path = typer.Argument(..., help="Directory to write the model, tokenizer and config into."),
    arch: str = typer.Option("llama", "--arch", help=f"Decoder architecture: one of {_ARCHS}."),
    layers: int = typer.Option(4, "--layers", min=1, help="Number of transformer blocks."),
    hidden: int = typer.Option(64, "--hidden", min=1, help="Hidden size (a multiple of the 4 heads)."),
    pretrain_steps: int = typer.Option(
        300, "--pretrain-steps", min=0, help="AdamW steps of pretraining on the pretrain corpus (0 = random init)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the corpus, the initialisation and the pretraining."),
    no_cache: bool = typer.Option(
        False, "--no-cache", help="Always rebuild; do not read or write the cache ($LORASWARM_CACHE)."
    ),
) -> None:
    """Build a tiny pretrained base model (tokenizer + weights) for a demo swarm."""
    import json

    from swarm.basemodel import META_FILE, make_base

    try:
        path = make_base(
            out_dir,
            arch=arch,
            layers=layers,
            hidden=hidden,
            pretrain_steps=pretrain_steps,
            seed=seed,
            use_cache=not no_cache,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    loss = json.loads((path / META_FILE).read_text()).get("pretrain_final_loss")
    typer.echo(f"wrote {arch} base model to {path.resolve()}" + (f" (pretrain loss {loss:.4f})" if loss else ""))


def make_data_command(
    out_dir: Path = typer.Argument(..., help="Directory to write train.jsonl and eval.jsonl into."),
    n_train: int = typer.Option(2000, "--n-train", min=1, help="Number of training documents."),
    n_eval: int = typer.Option(200, "--n-eval", min=1, help="Number of held-out documents."),
    seed: int = typer.Option(
        0, "--seed", help="Seed of the generated documents (eval is the tail of the same stream)."
    ),
) -> None:
    """Write finetune-domain documents (recipe cards) as DIR/train.jsonl and DIR/eval.jsonl."""
    from swarm.corpus import generate, write_jsonl

    texts = generate("finetune", n_train + n_eval, seed)
    train = write_jsonl(texts[:n_train], out_dir / "train.jsonl")
    eval_ = write_jsonl(texts[n_train:], out_dir / "eval.jsonl")
    typer.echo(f"wrote {n_train} documents to {train} and {n_eval} to {eval_}")


def register(app: typer.Typer) -> None:
    """Add the ``make-base`` and ``make-data`` commands to ``app``."""
    app.command("make-base")(make_base_command)
    app.command("make-data")(make_data_command)
