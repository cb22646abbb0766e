"""A chain of spans must reproduce the full PEFT model: same logits, same LoRA gradients (fp32)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from swarm.config import LoraSettings, SpanRange
from swarm.lora import attach_lora, export_lora_state, import_lora_state, init_lora_, lora_parameters, peft_lora_config
from swarm.span import load_span, load_trainer_head
from tests.conftest import ARCHS

LORA = LoraSettings(rank=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))


def reference_peft_model(ckpt: Path, lora: LoraSettings = LORA) -> torch.nn.Module:
    base = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="sdpa", dtype=torch.float32)
    model = get_peft_model(base, peft_lora_config(lora))
    init_lora_(lora_parameters(model), lora.init_seed)
    with torch.no_grad():  # non-zero B so that A receives gradients and LoRA changes the logits
        gen = torch.Generator().manual_seed(1)
        for key, p in lora_parameters(model).items():
            if "lora_B" in key:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def span_chain(ckpt: Path, cuts: list[int], state: dict[str, torch.Tensor]) -> list[torch.nn.Module]:
    spans = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        span = attach_lora(load_span(ckpt, SpanRange(start=a, end=b)), LORA)
        mine = lora_parameters(span)
        import_lora_state(span, {k: v for k, v in state.items() if k in mine})
        spans.append(span)
    return spans


@pytest.mark.timeout(120)
@pytest.mark.parametrize("arch", ARCHS)
def test_uneven_span_chain_matches_full_model(arch: str, tiny_checkpoint: Callable[..., Path]) -> None:
    ckpt = tiny_checkpoint(arch, layers=5)
    full = reference_peft_model(ckpt)
    spans = span_chain(ckpt, [0, 2, 5], export_lora_state(full))
    head = load_trainer_head(ckpt)
    ids = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(2))

    out = full(input_ids=ids, labels=ids)
    hidden = head.embed(ids)
    for span in spans:
        hidden = span(hidden)
    loss = head.loss(hidden, ids)
    assert (head.logits(hidden) - out.logits).abs().max().item() <= 1e-5
    assert abs(loss.item() - out.loss.item()) <= 1e-5

    out.loss.backward()
    loss.backward()
    reference = {k: p.grad for k, p in lora_parameters(full).items()}
    seen = 0
    for span in spans:
        for key, p in lora_parameters(span).items():
            assert p.grad is not None and reference[key] is not None
            assert reference[key].norm() > 0, key
            rel = ((p.grad - reference[key]).norm() / reference[key].norm()).item()
            assert rel <= 1e-5, (key, rel)
            seen += 1
    assert seen == len(reference) == 5 * 3 * 2


def test_only_lora_is_trainable(tiny_checkpoint: Callable[..., Path]) -> None:
    span = attach_lora(load_span(tiny_checkpoint("llama"), SpanRange(start=1, end=3)), LORA)
    trainable = {n for n, p in span.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert set(lora_parameters(span)) == {
        f"base_model.model.model.layers.{i}.{m}.lora_{ab}.weight"
        for i in (1, 2)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
        for ab in "AB"
    }


def test_replicas_initialise_identically(tiny_checkpoint: Callable[..., Path]) -> None:
    ckpt = tiny_checkpoint("llama")
    a = export_lora_state(attach_lora(load_span(ckpt, SpanRange(start=0, end=3)), LORA))
    b = export_lora_state(attach_lora(load_span(ckpt, SpanRange(start=2, end=5)), LORA))
    shared = a.keys() & b.keys()
    assert shared and all(torch.equal(a[k], b[k]) for k in shared)
    other = export_lora_state(
        attach_lora(load_span(ckpt, SpanRange(start=0, end=3)), LORA.model_copy(update={"init_seed": 1}))
    )
    assert any(not torch.equal(a[k], other[k]) for k in a if "lora_A" in k)


def test_import_rejects_bad_state_and_keeps_weights(tiny_checkpoint: Callable[..., Path]) -> None:
    span = attach_lora(load_span(tiny_checkpoint("llama"), SpanRange(start=0, end=2)), LORA)
    before = export_lora_state(span)
    key = next(iter(before))
    bad_nan = dict(before) | {key: torch.full_like(before[key], float("nan"))}
    with pytest.raises(ValueError, match="finite"):
        import_lora_state(span, bad_nan)
    bad_shape = dict(before) | {key: torch.zeros(before[key].shape[0] + 1, before[key].shape[1])}
    with pytest.raises(ValueError, match="shape"):
        import_lora_state(span, bad_shape)
    with pytest.raises(KeyError, match="missing"):
        import_lora_state(span, {k: v for k, v in before.items() if k != key})
    after = export_lora_state(span)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.timeout(120)
def test_assembled_adapter_loads_with_plain_peft(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    from peft import PeftModel

    from swarm.adapter import AdapterInfo, verify_adapter, write_adapter
    from swarm.adapter_tensors import merge_span_states
    from swarm.checkpoint import fingerprint
    from swarm.keys import generate_signing_key, write_public_key

    ckpt = tiny_checkpoint("qwen2", layers=5)
    cuts = [0, 3, 5]
    spans = span_chain(ckpt, cuts, export_lora_state(reference_peft_model(ckpt)))
    states = [export_lora_state(s) for s in spans]
    tensors = merge_span_states(states, [SpanRange(start=a, end=b) for a, b in zip(cuts, cuts[1:], strict=False)])
    key = generate_signing_key(tmp_path / "key")
    info = AdapterInfo(
        version="v1",
        parent_version=None,
        round_id="r1",
        base_model=str(ckpt),
        base_fingerprint=fingerprint(ckpt),
        contributors=[],
    )
    write_adapter(tmp_path / "adapter", tensors, LORA, info, key)
    verify_adapter(tmp_path / "adapter", write_public_key(key, tmp_path / "key.pub"))

    base = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="sdpa", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(3))
    head = load_trainer_head(ckpt)
    with torch.no_grad():
        hidden = head.embed(ids)
        for span in spans:
            hidden = span(hidden)
        chain_logits = head.logits(hidden)
        peft_logits = model(input_ids=ids).logits
    assert (peft_logits - chain_logits).abs().max().item() <= 1e-5
    with model.disable_adapter(), torch.no_grad():
        plain_logits = model(input_ids=ids).logits
    assert (plain_logits - chain_logits).abs().max().item() > 1e-4, "the adapter must change the logits"
