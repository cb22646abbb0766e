"""A span of transformer blocks ``[start, end)`` and the trainer's local pieces (embeddings, norm, LM head).

Only the tensors of the requested blocks are read from the checkpoint. Chaining spans that cover the model
reproduces the full model's forward exactly: the same rotary embeddings and the same causal masks
(``transformers.masking_utils``) are computed inside each span.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from swarm.checkpoint import load_tensors, read_config, resolve_checkpoint
from swarm.config import SpanRange
from swarm.quantize import Quantize, check_quantize, mark_quantized, quantize_block_

_CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}


def _model_class(config: Any, suffix: str) -> type[nn.Module]:
    module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    cls: type[nn.Module] = getattr(module, f"{_CLASS_PREFIX[config.model_type]}{suffix}")
    return cls


def _materialize(
    module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, dtype: torch.dtype, device: torch.device | str
) -> None:
    """Load ``prefix``-named tensors into a meta-device module, checking that every parameter is covered."""
    state = {k[len(prefix) :]: v.to(device=device, dtype=dtype) for k, v in tensors.items() if k.startswith(prefix)}
    expected = set(module.state_dict().keys())
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise KeyError(
            f"checkpoint tensors under {prefix!r} do not match the architecture: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    module.load_state_dict(state, assign=True, strict=True)


class Span(nn.Module):
    """Blocks ``[start, end)`` of a decoder; ``forward`` maps hidden states [batch, seq, hidden] to the same."""

    def __init__(self, config: Any, span: SpanRange, layers: dict[int, nn.Module], device: torch.device | str):
        super().__init__()
        self.config = config
        self.span = span
        # Keyed by the global block index so parameter names match the full model's ``model.layers.<i>``.
        self.layers = nn.ModuleDict({str(i): layers[i] for i in range(span.start, span.end)})
        self.rotary_emb = _model_class(config, "RotaryEmbedding")(config=config).to(device)
        layer_types = getattr(config, "layer_types", None)
        sliding = config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None
        self._mask_kind = {
            i: "sliding" if sliding or (layer_types and layer_types[i] == "sliding_attention") else "full"
            for i in range(span.start, span.end)
        }

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        seq_len = hidden_states.shape[1]
        position_ids = torch.arange(seq_len, device=hidden_states.device).unsqueeze(0)
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        mask_args = dict(
            config=self.config,
            inputs_embeds=hidden_states,
            attention_mask=None,
            past_key_values=None,
            position_ids=position_ids,
        )
        masks: dict[str, Any] = {}
        for i in range(self.span.start, self.span.end):
            kind = self._mask_kind[i]
            if kind not in masks:
                make = create_sliding_window_causal_mask if kind == "sliding" else create_causal_mask
                masks[kind] = make(**mask_args)  # type: ignore[arg-type]
            hidden_states = self.layers[str(i)](
                hidden_states,
                attention_mask=masks[kind],
                position_ids=position_ids,
                position_embeddings=position_embeddings,
            )
        return hidden_states


class TrainerHead(nn.Module):
    """The frozen pieces a trainer runs locally: token embeddings before the spans, norm + LM head after."""

    def __init__(self, config: Any, embed: nn.Embedding, norm: nn.Module, lm_head: nn.Linear):
        super().__init__()
        self.config = config
        self.embed_tokens, self.norm, self.lm_head = embed, norm, lm_head
        for p in self.parameters():
            p.requires_grad_(False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden_states))

    def loss(self, hidden_states: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of ``input_ids`` (labels = inputs shifted by one)."""
        logits = self.logits(hidden_states)[:, :-1].float()
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


def load_span(
    path_or_id: str | Path,
    span: SpanRange,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    quantize: Quantize = "none",
) -> Span:
    """Build blocks ``[start, end)`` and read only their tensors from the checkpoint's safetensors files.

    ``quantize`` (``nf4`` / ``int8``) keeps the blocks' Linear weights in 4 / 8 bits (see :mod:`swarm.quantize`);
    ``dtype`` is then the compute dtype of activations, norms and LoRA.
    """
    check_quantize(quantize)
    root = resolve_checkpoint(path_or_id)
    config = read_config(root)
    span.check_within(int(config.num_hidden_layers))
    layer_cls = _model_class(config, "DecoderLayer")
    layers: dict[int, nn.Module] = {}
    for i in range(span.start, span.end):
        with torch.device("meta"):
            layer = layer_cls(config, layer_idx=i)
        prefix = f"model.layers.{i}."
        names = [prefix + k for k in layer.state_dict()]
        _materialize(layer, load_tensors(root, names), prefix, dtype, device if quantize == "none" else "cpu")
        if quantize != "none":
            quantize_block_(layer, quantize, dtype, device)
        layers[i] = layer
    module = Span(config, span, layers, device)
    mark_quantized(module, quantize)
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def load_trainer_head(
    path_or_id: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> TrainerHead:
    """Read the token embeddings, final norm and LM head (tied to the embeddings when the config says so)."""
    root = resolve_checkpoint(path_or_id)
    config = read_config(root)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    names = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if tied else ["lm_head.weight"])
    tensors = load_tensors(Path(root), names)
    with torch.device("meta"):
        embed = nn.Embedding(config.vocab_size, config.hidden_size)
        norm = _model_class(config, "RMSNorm")(config.hidden_size, eps=config.rms_norm_eps)
        lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    _materialize(embed, tensors, "model.embed_tokens.", dtype, device)
    _materialize(norm, tensors, "model.norm.", dtype, device)
    if tied:
        lm_head.weight = embed.weight
    else:
        _materialize(lm_head, tensors, "lm_head.", dtype, device)
    return TrainerHead(config, embed, norm, lm_head).eval()
