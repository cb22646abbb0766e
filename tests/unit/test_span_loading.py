"""Loading a span reads only its blocks; bad configuration fails at construction naming field and values."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

import swarm.checkpoint
from swarm.config import LoraSettings, SpanRange
from swarm.lora import attach_lora
from swarm.span import load_span, load_trainer_head


class RecordingSafeOpen:
    """Wraps safetensors.safe_open and records every tensor name actually read."""

    def __init__(self, real: Any) -> None:
        self.real, self.read = real, []  # type: ignore[var-annotated]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        recorder = self

        class Handle:
            def __enter__(self) -> Any:
                self.inner = recorder.real(*args, **kwargs).__enter__()
                return self

            def __exit__(self, *exc: Any) -> None:
                self.inner.__exit__(*exc)

            def keys(self) -> list[str]:
                return list(self.inner.keys())

            def get_tensor(self, name: str) -> Any:
                recorder.read.append(name)
                return self.inner.get_tensor(name)

        return Handle()


def test_span_reads_only_its_blocks(tiny_checkpoint: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tiny_checkpoint("qwen2", layers=5)
    recorder = RecordingSafeOpen(swarm.checkpoint.safe_open)
    monkeypatch.setattr(swarm.checkpoint, "safe_open", recorder)
    span = load_span(ckpt, SpanRange(start=1, end=3))
    assert recorder.read, "no tensor was read"
    assert {name.split(".")[2] for name in recorder.read} == {"1", "2"}
    assert all(name.startswith("model.layers.") for name in recorder.read)
    assert sorted(span.layers.keys()) == ["1", "2"]

    recorder.read.clear()
    load_trainer_head(ckpt)
    assert sorted(recorder.read) == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]


def test_span_outside_model(tiny_checkpoint: Callable[..., Path]) -> None:
    with pytest.raises(ValueError, match=r"outside the model.*\[0, 5\)"):
        load_span(tiny_checkpoint("llama"), SpanRange(start=3, end=7))


@pytest.mark.parametrize(("start", "end"), [(-1, 2), (3, 3), (4, 2)])
def test_span_range_validated(start: int, end: int) -> None:
    with pytest.raises(ValidationError, match="0 <= start < end"):
        SpanRange(start=start, end=end)


def test_rank_zero_names_field() -> None:
    with pytest.raises(ValidationError, match="lora.rank must be a positive integer"):
        LoraSettings(rank=0)


def test_unknown_target_module_lists_allowed() -> None:
    with pytest.raises(ValidationError, match=r"unknown module\(s\) \['qkv'\].*allowed values: .*q_proj"):
        LoraSettings(target_modules=("qkv",))


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_span(tmp_path / "nope", SpanRange(start=0, end=1))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_span(tmp_path / "empty", SpanRange(start=0, end=1))


def test_unknown_architecture(tmp_path: Path) -> None:
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(
        ValueError, match="unknown architecture model_type='gpt2'; allowed values: llama, mistral, qwen2"
    ):
        load_span(tmp_path, SpanRange(start=0, end=1))


def test_dropout_out_of_range() -> None:
    with pytest.raises(ValidationError, match=r"lora.dropout must be in \[0, 1\)"):
        LoraSettings(dropout=1.5)


def test_attach_lora_targets_mlp_modules(tiny_checkpoint: Callable[..., Path]) -> None:
    span = load_span(tiny_checkpoint("llama"), SpanRange(start=0, end=1))
    span = attach_lora(span, LoraSettings(target_modules=("gate_proj",)))
    assert any("gate_proj.lora_A" in n for n, _ in span.named_parameters())


def test_block_nbytes_from_headers(tiny_checkpoint: Callable[..., Path]) -> None:
    from swarm.checkpoint import block_nbytes

    ckpt = tiny_checkpoint("llama", layers=5)
    span = load_span(ckpt, SpanRange(start=2, end=3))
    expected = sum(p.numel() for p in span.layers["2"].parameters()) * 2
    assert block_nbytes(ckpt, 2, 2) == expected
    with pytest.raises(KeyError, match="no tensors for block 9"):
        block_nbytes(ckpt, 9, 4)
