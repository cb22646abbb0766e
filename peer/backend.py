"""hivemind.moe backend of a span with LoRA: validated inputs, a shared lock, training through hivemind.Optimizer.

Remote requests are run by hivemind's ``Runtime`` thread (forward, then backward that recomputes the forward).
The peer's own trainer uses :meth:`SpanBackend.local_step` instead; both go through ``self.lock`` so LoRA
gradients and optimizer steps never interleave.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from hivemind.moe.server.connection_handler import ConnectionHandler
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.moe.server.task_pool import TaskPool
from hivemind.utils.tensor_descr import BatchTensorDescriptor

from swarm.lora import lora_parameters
from swarm.quantize import frozen_memo


class BadRequestError(ValueError):
    """A remote request that does not match the span's schema (shape, dtype, non-finite values)."""


def check_hidden(name: str, tensor: torch.Tensor, seq_len: int, hidden: int, dtype: torch.dtype) -> None:
    """Raise :class:`BadRequestError` naming what is wrong with a hidden-state tensor."""
    expected = f"[batch, {seq_len}, {hidden}] {str(dtype).removeprefix('torch.')}"
    if tensor.dim() != 3 or tensor.shape[0] < 1 or tuple(tensor.shape[1:]) != (seq_len, hidden):
        raise BadRequestError(f"{name} has shape {list(tensor.shape)}, expected {expected}")
    if tensor.dtype != dtype:
        raise BadRequestError(f"{name} has dtype {str(tensor.dtype).removeprefix('torch.')}, expected {expected}")
    if not torch.isfinite(tensor).all():
        raise BadRequestError(f"{name} contains NaN or Inf values")


class SpanBackend(ModuleBackend):
    """A ``ModuleBackend`` whose optimizer is a ``hivemind.Optimizer`` over the span's LoRA parameters."""

    def __init__(
        self,
        name: str,
        span: torch.nn.Module,
        *,
        seq_len: int,
        dtype: torch.dtype,
        on_served: Callable[[str, int, float], None] | None = None,
        after_accumulate: Callable[[], Any] | None = None,
        **kwargs: Any,
    ):
        hidden = int(span.config.hidden_size)  # type: ignore[union-attr, arg-type]
        self.seq_len, self.hidden, self.dtype = seq_len, hidden, dtype
        self.lock = threading.RLock()
        self.on_served, self.after_accumulate = on_served, after_accumulate
        schema = (BatchTensorDescriptor(seq_len, hidden, dtype=dtype),)
        super().__init__(name, span, args_schema=schema, outputs_schema=schema[0], **kwargs)
        self.samples_trained = 0
        self._threads = threading.local()  # each trainer thread gets its own twin (micro-batches in flight)

    @property
    def twin(self) -> torch.nn.Module:
        """This thread's twin of the span: shares the frozen base weights, owns a copy of LoRA (see local_forward)."""
        return self._twin_pairs()[0]

    def _twin_pairs(self) -> tuple[torch.nn.Module, list[tuple[torch.nn.Parameter, torch.nn.Parameter]]]:
        found = getattr(self._threads, "twin", None)
        if found is None:
            with self.lock:
                twin = copy.deepcopy(self.module, frozen_memo(self.module))
            masters = lora_parameters(self.module).values()
            found = (twin, list(zip(masters, lora_parameters(twin).values(), strict=True)))
            self._threads.twin = found
        return found  # type: ignore[no-any-return]

    # --- remote path (Runtime thread) -------------------------------------------------------------
    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        started = time.perf_counter()
        with self.lock:
            out = super().forward(*inputs)
        self._served("forward", inputs[0].shape[0], started)
        return out

    def backward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        started = time.perf_counter()
        with self.lock:
            out = super().backward(*inputs)
        self._served("backward", inputs[0].shape[0], started)
        return out

    def on_backward(self, batch_size: int) -> None:
        """Add this batch's LoRA gradients to the epoch's accumulators; end the epoch if this batch completed it."""
        if self.optimizer is not None:
            self.optimizer.accumulate(batch_size)  # type: ignore[attr-defined]
            self.optimizer.zero_grad()
        self.samples_trained += batch_size
        if self.after_accumulate is not None:
            self.after_accumulate()

    def _served(self, kind: str, batch: int, started: float) -> None:
        if self.on_served is not None:
            self.on_served(kind, batch, time.perf_counter() - started)

    # --- local path (trainer thread) --------------------------------------------------------------
    def local_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Forward on this thread's twin with a live autograd graph (no recomputation in backward).

        Each trainer thread has its own twin, so several micro-batches can be in flight: copying the current LoRA
        into a twin never touches a tensor that another micro-batch's graph saved for its backward.
        """
        twin, pairs = self._twin_pairs()
        with self.lock, torch.no_grad():
            for master, copy_ in pairs:
                copy_.copy_(master)
        return twin(hidden)

    def local_apply_grads(self, batch_size: int) -> None:
        """After the trainer's backward: move this thread's twin LoRA gradients to the master and accumulate them."""
        _, pairs = self._twin_pairs()
        with self.lock:
            for master, twin in pairs:
                if twin.grad is None:
                    continue
                master.grad = twin.grad.detach().clone() if master.grad is None else master.grad + twin.grad
                twin.grad = None
            self.on_backward(batch_size)


class ValidatingConnectionHandler(ConnectionHandler):
    """Checks every request before it reaches a TaskPool, so one bad request never fails a batch of others."""

    async def _process_inputs(self, inputs: list[torch.Tensor], pool: TaskPool, schema: Any) -> list[Any]:
        backend = next((b for b in self.module_backends.values() if pool in b.get_pools()), None)
        if isinstance(backend, SpanBackend):
            expected = 1 if pool is backend.forward_pool else 2
            if len(inputs) != expected:
                raise BadRequestError(f"expected {expected} tensor(s), got {len(inputs)}")
            for name, tensor in zip(("hidden_states", "grad_outputs"), inputs, strict=False):
                check_hidden(name, tensor, backend.seq_len, backend.hidden, backend.dtype)
            if expected == 2 and inputs[0].shape != inputs[1].shape:
                raise BadRequestError(
                    f"grad_outputs shape {list(inputs[1].shape)} differs from hidden_states {list(inputs[0].shape)}"
                )
        return await super()._process_inputs(inputs, pool, schema)
