"""Shared fixtures: tiny random checkpoints of every supported architecture, saved as real HF directories."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

ARCHS = ("llama", "mistral", "qwen2")


def _save_tiny(out: Path, arch: str, layers: int, seed: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    cfg = cls(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_checkpoint(arch, layers=5)`` -> directory of a random tiny causal LM (cached per session)."""
    made: dict[tuple[str, int], Path] = {}

    def make(arch: str = "llama", layers: int = 5) -> Path:
        if (arch, layers) not in made:
            made[arch, layers] = _save_tiny(tmp_path_factory.mktemp(f"{arch}{layers}"), arch, layers, seed=0)
        return made[arch, layers]

    return make


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:  # type: ignore[type-arg]
    """When a test that started peer processes fails, attach the tail of each peer's log to the report (CI keeps
    only the report: without this a swarm failure there cannot be diagnosed)."""
    report = yield
    if report.when == "call" and report.failed:
        tmp = getattr(item, "funcargs", {}).get("tmp_path")
        if isinstance(tmp, Path):
            for log in sorted(tmp.rglob("log.txt"))[:8]:
                lines = log.read_text(errors="replace").splitlines()[-60:]
                report.sections.append((f"peer log {log.relative_to(tmp)} (last 60 lines)", "\n".join(lines)))
    return report
