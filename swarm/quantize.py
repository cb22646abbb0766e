"""Frozen base weights of a span in 4 or 8 bits (bitsandbytes), QLoRA style: LoRA stays in the compute dtype.

``quantize_block_`` replaces every ``nn.Linear`` of one decoder block by a bitsandbytes layer (``Linear4bit`` NF4
with double-quantized statistics, or ``Linear8bitLt`` LLM.int8 with outlier threshold 6) whose weight is
quantized when it moves to its device; norms stay in the compute dtype. PEFT injects its bnb LoRA layers on top
(``mark_quantized`` sets the flags PEFT reads), so LoRA parameter names and shapes are those of an unquantized
span: the adapter a quantized peer helps train loads with plain PEFT on the full-precision base.

Importable without torch (``Quantize`` is used by configs). Memory: :func:`block_nbytes_quantized` predicts one block's resident bytes from the checkpoint's safetensors
headers (no tensor read: for the self-check, before loading); :func:`module_nbytes` measures what a loaded module
holds (for ``/metrics`` and the bench).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import torch
    from torch import nn

Quantize = Literal["none", "nf4", "int8"]
QUANTIZE_MODES: tuple[str, ...] = get_args(Quantize)

NF4_BLOCKSIZE = 64  # bitsandbytes' default for Linear4bit: one absmax per 64 weights
NF4_NESTED_BLOCKSIZE = 256  # double quantization: the absmaxes are quantized to 8 bits, one fp32 per 256 of them
INT8_THRESHOLD = 6.0  # LLM.int8 outlier threshold (transformers' default llm_int8_threshold)


class _DropNotice(logging.Filter):
    """Drops one bitsandbytes log message that is expected here, not news."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_bitsandbytes() -> None:
    """Silence two expected notices (call before bitsandbytes is imported; ``import swarm`` does).

    LLM.int8 casts activations to float16 and says so at every call; on an AVX512-BF16 CPU, bitsandbytes says at
    import that the optional ``kernels`` package for its packed inference layout is missing (we never use that
    layout: it has no autograd, see ``quantize_block_``).
    """
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_DropNotice("MatMul8bitLt: inputs will be cast"))
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropNotice("Failed to load CPU gemm_4bit_forward"))


def check_quantize(mode: str) -> Quantize:
    """Return ``mode`` if known, else raise ``ValueError`` naming the allowed values."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantize mode {mode!r}; allowed values: {', '.join(QUANTIZE_MODES)}")
    return mode  # type: ignore[return-value]


def _bnb() -> object:
    try:
        import bitsandbytes
    except ImportError as exc:  # a clear line instead of a traceback deep inside PEFT
        raise ImportError(
            f"--quantize needs bitsandbytes ({exc}); install it with `pip install 'bitsandbytes==0.50.*'`"
        ) from exc
    return bitsandbytes


def _quantized_linear(linear: nn.Linear, mode: Quantize, compute_dtype: torch.dtype) -> nn.Module:
    bnb = _bnb().nn  # type: ignore[attr-defined]
    bias = linear.bias is not None
    weight = linear.weight.data.to("cpu")
    if mode == "nf4":
        layer = bnb.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=bias,
            compute_dtype=compute_dtype,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        layer.weight = bnb.Params4bit(
            weight, requires_grad=False, compress_statistics=True, quant_type="nf4", blocksize=NF4_BLOCKSIZE
        )
        # On a CPU with AVX512-BF16, bitsandbytes repacks the weight at the first eval-mode forward without grad
        # and from then on runs a kernel with no autograd: the gradient w.r.t. the input is silently dropped
        # (hivemind runs exactly that forward before each backward). Keep the trainable layout.
        layer.support_avx512bf16_for_cpu = False
    else:
        layer = bnb.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=bias,
            has_fp16_weights=False,
            threshold=INT8_THRESHOLD,
            device="meta",
        )
        layer.weight = bnb.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if bias:
        import torch

        layer.bias = torch.nn.Parameter(linear.bias.data.to("cpu", compute_dtype), requires_grad=False)
    return layer


def quantize_block_(block: nn.Module, mode: Quantize, compute_dtype: torch.dtype, device: torch.device | str) -> None:
    """Replace every ``nn.Linear`` inside ``block`` by its ``mode`` bitsandbytes twin, on ``device``, in place.

    ``block`` holds full-precision weights on the CPU (one block at a time, so the peak is one block in full
    precision); each weight is quantized by bitsandbytes as it moves to ``device``.
    """
    from torch import nn

    check_quantize(mode)
    if mode == "none":
        block.to(device)
        return
    targets = [(name, m) for name, m in block.named_modules() if type(m) is nn.Linear]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        layer = _quantized_linear(linear, mode, compute_dtype).to(device)
        if mode == "int8":
            # Move the int8 weights and scales to the layer's state now. bitsandbytes does it at the first forward
            # and clears them on the weight, which a twin sharing that weight (a trainer thread's deepcopy) would
            # then do behind this layer's back: it would be left with no scales.
            layer.init_8bit_state()  # type: ignore[operator]  # nn.Module attribute lookup
        setattr(parent, child, layer)
    for t in [*block.parameters(), *block.buffers()]:
        if t.is_floating_point():  # norms, biases: own copies, so none keeps the checkpoint's memory map resident
            t.data = t.data.to(device, copy=True)


def compute_dtype_of(module: nn.Module) -> torch.dtype:
    """The dtype of the floating-point frozen tensors (norms): activations and LoRA use it."""
    for p in module.parameters():
        if p.is_floating_point() and not p.requires_grad:
            return p.dtype
    raise ValueError("module has no frozen floating-point parameter to take the compute dtype from")


def mark_quantized(module: nn.Module, mode: Quantize) -> None:
    """Set the attributes PEFT reads to pick its bitsandbytes LoRA layers (``is_loaded_in_4bit`` / ``_8bit``)."""
    module.is_loaded_in_4bit = mode == "nf4"  # type: ignore[assignment]
    module.is_loaded_in_8bit = mode == "int8"  # type: ignore[assignment]
    module.quantize = mode  # type: ignore[assignment]


def _tensors_of(module: nn.Module) -> list[torch.Tensor]:
    """Every tensor a module keeps alive: parameters, buffers and bitsandbytes' side tensors (absmax, scales)."""
    from torch import Tensor

    found: list[torch.Tensor] = [*module.parameters(), *module.buffers()]
    holders: list[object] = list(found) + [m.state for m in module.modules() if hasattr(m, "state")]
    for holder in holders:
        state = getattr(holder, "quant_state", None)  # NF4: absmax (nested), codebooks
        while state is not None:
            found += [t for t in (state.absmax, state.code, getattr(state, "offset", None)) if t is not None]
            state = getattr(state, "state2", None)
        # int8: row scales and int8 weights, on the weight until the first forward, then on the layer's state
        found += [t for t in (getattr(holder, "SCB", None), getattr(holder, "CB", None)) if isinstance(t, Tensor)]
    return found


def module_nbytes(module: nn.Module, frozen_only: bool = False) -> int:
    """Bytes of tensor storage ``module`` holds (each storage counted once: tied or shared tensors are not doubled).

    ``frozen_only`` leaves out trainable tensors (LoRA), to compare with :func:`block_nbytes_quantized`.
    """
    seen: dict[tuple[str, int], int] = {}
    for t in _tensors_of(module):
        if frozen_only and t.requires_grad:
            continue
        storage = t.untyped_storage()
        seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def _linear_nbytes(shape: tuple[int, ...], mode: Quantize, dtype_bytes: int) -> int:
    numel = 1
    for d in shape:
        numel *= d
    if mode == "nf4":
        blocks = -(-numel // NF4_BLOCKSIZE)
        nested = -(-blocks // NF4_NESTED_BLOCKSIZE)
        # packed 4-bit weights + 8-bit absmax per block + fp32 absmax per nested block + codebooks and offset
        return -(-numel // 2) + blocks + 4 * nested + 4 * (16 + 256 + 1)
    if mode == "int8":
        return numel + 4 * shape[0]  # int8 weights + one fp32 scale per output row
    return numel * dtype_bytes


def block_nbytes_quantized(path_or_id: str | Path, block: int, mode: Quantize, dtype_bytes: int) -> int:
    """Predicted resident bytes of one block quantized with ``mode`` (compute dtype of ``dtype_bytes`` bytes).

    Reads only the safetensors headers. 2-D ``*_proj.weight`` tensors are the Linear weights that get quantized;
    the rest (norms, biases) stays in the compute dtype.
    """
    from safetensors import safe_open

    from swarm.checkpoint import resolve_checkpoint, weight_map

    check_quantize(mode)
    root = resolve_checkpoint(path_or_id)
    prefix = f"model.layers.{block}."
    wmap = weight_map(root)
    total = 0
    for file_name in sorted({f for name, f in wmap.items() if name.startswith(prefix)}):
        with safe_open(str(root / file_name), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if not name.startswith(prefix):
                    continue
                shape = tuple(int(d) for d in f.get_slice(name).get_shape())
                is_linear = len(shape) == 2 and name.endswith("_proj.weight")
                total += _linear_nbytes(shape, mode if is_linear else "none", dtype_bytes)
    if total == 0:
        raise KeyError(f"checkpoint {root} has no tensors for block {block}")
    return total


def span_block_nbytes(span: nn.Module) -> int:
    """Frozen bytes per block of a loaded :class:`swarm.span.Span` (the mean over its blocks)."""
    layers = list(span.get_submodule("layers").children())
    return sum(module_nbytes(layer, frozen_only=True) for layer in layers) // max(len(layers), 1)
