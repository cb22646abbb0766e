"""One span replica: LoRA on a span of blocks, its forward/backward for the trainers, and its replica group.

The trainers' micro-batches of step ``s`` are served only while this replica is at epoch ``s`` (a request for a
later step waits for it: the pipeline flush at the step boundary; one for an earlier step is refused as stale).
A forward keeps its autograd graph for the backward under a memory budget (:class:`ActivationCache`); the
backward returns the gradient w.r.t. the input and keeps the micro-batch's LoRA gradients apart
(:class:`GradientStore`), so the epoch applies exactly the micro-batches the trainers declared for the step.
The same methods serve remote requests (:mod:`peer.transport`) and the trainer of this very peer (no network).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Any

import hivemind
import torch
from hivemind.utils.logging import get_logger

from peer.replica_group import GroupSettings, ReplicaGroup
from peer.roster_view import OPEN, Membership
from swarm.config import RoundSpec, SpanRange
from swarm.dht_records import ServerAnnouncement
from swarm.lora import attach_lora, export_lora_state, import_lora_state, lora_parameters
from swarm.quantize import Quantize
from swarm.span import load_span
from swarm.steps import MicroBatchKey, StepContents

log = get_logger(__name__)
ALIVE_TIMEOUT_S = 2.0  # a replica that does not answer rpc_info this fast (twice) is taken as gone


class BadRequestError(ValueError):
    """A request that does not match the span's schema (shape, dtype, non-finite values, metadata)."""


class NotMemberError(PermissionError):
    """The caller is not a member of the round's roster: nothing is computed for it."""

    def __init__(self, caller: str):
        super().__init__(f"NOT_A_MEMBER: {caller} is not in the round's roster")


class StaleStepError(RuntimeError):
    """The request's step is over on this replica (``epoch`` says where it is)."""

    def __init__(self, step: int, epoch: int):
        super().__init__(f"STALE_STEP: step {step} is over here (epoch {epoch})")
        self.step, self.epoch = step, epoch


class MissingActivationsError(RuntimeError):
    """A backward for a micro-batch whose forward this replica does not hold: resend it with its inputs."""

    def __init__(self) -> None:
        super().__init__("NO_ACTIVATIONS: resend the backward with the span's inputs")


def expert_uid(round_id: str, span: SpanRange) -> str:
    """Name of a span's service in a round (the p2p handler namespace)."""
    return f"ls_{round_id.replace('.', '_')}_span{span.start}_{span.end}"


def check_hidden(name: str, tensor: torch.Tensor, seq_len: int, hidden: int, dtype: torch.dtype) -> None:
    """Raise :class:`BadRequestError` naming what is wrong with a hidden-state tensor."""
    expected = f"[batch, {seq_len}, {hidden}] {str(dtype).removeprefix('torch.')}"
    if tensor.dim() != 3 or tensor.shape[0] < 1 or tuple(tensor.shape[1:]) != (seq_len, hidden):
        raise BadRequestError(f"{name} has shape {list(tensor.shape)}, expected {expected}")
    if tensor.dtype != dtype:
        raise BadRequestError(f"{name} has dtype {str(tensor.dtype).removeprefix('torch.')}, expected {expected}")
    if not torch.isfinite(tensor).all():
        raise BadRequestError(f"{name} contains NaN or Inf values")


class ActivationCache:
    """Forward graphs kept for their backward, oldest evicted first beyond ``budget`` bytes (then: recompute)."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self._items: OrderedDict[tuple[int, str, int], tuple[torch.Tensor, torch.Tensor, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.evicted = 0

    def put(self, key: tuple[int, str, int], inp: torch.Tensor, out: torch.Tensor, nbytes: int) -> None:
        with self._lock:
            self._drop(key)
            self._items[key] = (inp, out, nbytes)
            self.used += nbytes
            while self.used > self.budget and self._items:
                self._drop(next(iter(self._items)))
                self.evicted += 1

    def pop(self, key: tuple[int, str, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        with self._lock:
            found = self._items.pop(key, None)
            if found is None:
                return None
            self.used -= found[2]
            return found[0], found[1]

    def drop_before(self, step: int) -> None:
        with self._lock:
            for key in [k for k in self._items if k[0] < step]:
                self._drop(key)

    def _drop(self, key: tuple[int, str, int]) -> None:
        found = self._items.pop(key, None)
        if found is not None:
            self.used -= found[2]


class GradientStore:
    """LoRA gradients of each micro-batch served at each step, summed only over what the step declares.

    ``max_norm`` > 0 clips each micro-batch's gradient (L2 over all its LoRA tensors) before it is kept, so one
    contributor's micro-batch moves the step by a bounded amount; non-finite gradients are refused.
    """

    def __init__(self, max_norm: float = 0.0) -> None:
        self._items: dict[tuple[int, str, int], tuple[int, list[torch.Tensor]]] = {}
        self._lock = threading.Lock()
        self.max_norm = max_norm
        self.clipped = 0

    def add(self, step: int, key: MicroBatchKey, samples: int, grads: list[torch.Tensor]) -> None:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        if not torch.isfinite(norm):
            raise BadRequestError("the micro-batch's LoRA gradients are not finite (grad_outputs too large?)")
        if self.max_norm > 0 and norm > self.max_norm:
            grads = [g * (self.max_norm / float(norm)) for g in grads]
            self.clipped += 1
        with self._lock:
            self._items[(step, *key)] = (samples, grads)

    def take(self, contents: StepContents, like: list[torch.nn.Parameter]) -> tuple[list[torch.Tensor], int]:
        """Sum (weighted by samples) of the declared micro-batches held here, in a fixed order; drops the step."""
        with self._lock:
            mine = sorted(k for k in self._items if k[0] == contents.step and (k[1], k[2]) in contents.microbatches)
            picked = [self._items[k] for k in mine]
            for k in [k for k in self._items if k[0] <= contents.step]:
                del self._items[k]
        sums = [torch.zeros_like(p, dtype=torch.float32, device="cpu") for p in like]
        samples = 0
        for n, grads in picked:
            samples += n
            for s, g in zip(sums, grads, strict=True):
                s.add_(g.float().cpu(), alpha=float(n))
        return sums, samples

    def drop_before(self, step: int) -> None:
        with self._lock:
            for k in [k for k in self._items if k[0] < step]:
                del self._items[k]


def make_optimizer(spec: RoundSpec, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    opt = spec.optimizer
    factory = (
        partial(torch.optim.AdamW, lr=opt.lr, weight_decay=opt.weight_decay)
        if opt.name == "adamw"
        else partial(torch.optim.SGD, lr=opt.lr, weight_decay=opt.weight_decay)
    )
    return factory(params)  # type: ignore[no-any-return]


class SpanServer:
    """A span with LoRA: computes the trainers' micro-batches of the current step; its replica group steps it."""

    def __init__(
        self,
        spec: RoundSpec,
        span: SpanRange,
        dht: hivemind.DHT,
        *,
        step_contents: Callable[[int], StepContents | None],
        replicas: Callable[[], dict[str, tuple[int, int]]],
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        initial_state: dict[str, torch.Tensor] | None = None,
        announce: Callable[[], None] = lambda: None,
        on_served: Callable[[str, int, float], None] | None = None,
        on_averaging: Callable[[bool, float], None] | None = None,
        on_epoch: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
        max_batch_size: int = 64,
        activation_budget: int = 1 << 30,
        request_wait: float = 60.0,
        quantize: Quantize = "none",
        members: Membership = OPEN,
    ):
        spec.span_index(span)
        self.members, self.quantize = members, str(quantize)
        self.refused_callers: set[str] = set()  # callers refused as non-members (peer ids)
        self.spec, self.span, self.dht = spec, span, dht
        self.uid = expert_uid(spec.round_id, span)
        self.peer_id = str(dht.peer_id)
        self.device, self.dtype = device, dtype
        self.seq_len, self.max_batch_size, self.request_wait = spec.data.seq_len, max_batch_size, request_wait
        self.module = attach_lora(
            load_span(spec.base.path, span, dtype=dtype, device=device, quantize=quantize), spec.lora
        )
        self.hidden = int(self.module.config.hidden_size)  # type: ignore[union-attr, arg-type]
        if initial_state is not None:
            mine = lora_parameters(self.module)
            import_lora_state(self.module, {k: v for k, v in initial_state.items() if k in mine})
        self.params = list(lora_parameters(self.module).values())
        self.on_served, self.on_epoch = on_served, on_epoch
        self.cache = ActivationCache(activation_budget)
        self.grads = GradientStore(spec.optimizer.max_microbatch_grad_norm)
        self.samples_trained = 0
        self.group = ReplicaGroup(
            dht,
            GroupSettings(spec.run_id(span), spec.optimizer.matchmaking_time, spec.optimizer.averaging_timeout),
            self.params,
            make_optimizer(spec, self.params),
            take_gradients=lambda contents: self.grads.take(contents, self.params),
            step_contents=step_contents,
            replicas=replicas,
            announce=announce,
            on_epoch=self._settled,
            on_averaging=on_averaging or (lambda ok, seconds: None),
            admits=lambda peer_id: members.allows(peer_id, (span.start, span.end)),
            download=self.download_state,
            alive=self.alive,
            contribution=self.contribution_of,
        )
        self._client_p2p: Any = None
        self.transport: Any = None

    @property
    def epoch(self) -> int:
        return self.group.epoch

    @property
    def lock(self) -> threading.Lock:
        return self.group.lock

    def announcement(self, throughput: float, **fields: Any) -> ServerAnnouncement:
        """This span's DHT record; ``fields`` adds the rest (the daemon: state, versions, addresses)."""
        return ServerAnnouncement(
            peer_id=self.peer_id,
            span_start=self.span.start,
            span_end=self.span.end,
            throughput=throughput,
            expert_uid=self.uid,
            epoch=self.epoch,
            failed_epoch=self.group.failed_epoch,
            quantize=self.quantize,
            **fields,
        )

    # --- compute (remote requests and the local trainer) ---------------------------------------------------
    def _at_step(self, step: int) -> int:
        """Wait until this replica is at epoch ``step``; returns the parameter version to check after compute."""
        epoch = self.group.wait_for(step, self.request_wait)
        if epoch > step:
            raise StaleStepError(step, epoch)
        if epoch < step:
            raise TimeoutError(f"span {self.span.name} is still at epoch {epoch}, the request is for step {step}")
        version = self.group.version
        if version % 2:  # parameters are being changed right now: the step just ended
            raise StaleStepError(step, epoch + 1)
        return version

    def _check_unchanged(self, step: int, version: int) -> None:
        if self.group.version != version:
            raise StaleStepError(step, self.group.epoch)

    def check_input(self, name: str, tensor: torch.Tensor) -> None:
        check_hidden(name, tensor, self.seq_len, self.hidden, self.dtype)
        if tensor.shape[0] > self.max_batch_size:
            raise BadRequestError(
                f"{name} has batch {tensor.shape[0]}, this server takes at most {self.max_batch_size}"
            )

    def forward(self, step: int, key: MicroBatchKey, hidden: torch.Tensor) -> torch.Tensor:
        """Forward of a training micro-batch of ``step``; its graph is kept for the backward when it fits."""
        self.check_input("hidden_states", hidden)
        started = time.perf_counter()
        version = self._at_step(step)
        inp = hidden.to(self.device).detach().requires_grad_(True)
        with torch.enable_grad():
            out = self.module(inp)
        self._check_unchanged(step, version)
        per_block = inp.numel() * inp.element_size() * 12  # saved activations of a block, roughly
        self.cache.put((step, *key), inp, out, per_block * len(self.span))
        self._served("forward", hidden.shape[0], started)
        return out.detach()

    def backward(
        self, step: int, key: MicroBatchKey, grad_output: torch.Tensor, hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Backward of a micro-batch of ``step``: keeps its LoRA gradients, returns d loss / d input.

        Uses the forward's kept graph; without it (evicted, or the forward ran on another replica before a
        failover) recomputes from ``hidden``, and raises :class:`MissingActivationsError` if it was not sent.
        """
        self.check_input("grad_outputs", grad_output)
        if hidden is not None:
            self.check_input("hidden_states", hidden)
            if hidden.shape != grad_output.shape:
                raise BadRequestError(
                    f"grad_outputs shape {list(grad_output.shape)} differs from hidden_states {list(hidden.shape)}"
                )
        started = time.perf_counter()
        version = self._at_step(step)
        kept = self.cache.pop((step, *key))
        if kept is None:
            if hidden is None:
                raise MissingActivationsError()
            inp = hidden.to(self.device).detach().requires_grad_(True)
            with torch.enable_grad():
                out = self.module(inp)
        else:
            inp, out = kept
            if out.shape != grad_output.shape:
                raise BadRequestError(f"grad_outputs shape {list(grad_output.shape)} differs from the forward's")
        grads = torch.autograd.grad(out, [inp, *self.params], grad_output.to(out.device, out.dtype))
        self._check_unchanged(step, version)
        batch = int(grad_output.shape[0])
        self.grads.add(step, key, batch, [g.detach() for g in grads[1:]])
        self.group.poke()
        self.samples_trained += batch
        self._served("backward", batch, started)
        return grads[0].detach()

    @torch.no_grad()
    def evaluate(self, step: int, hidden: torch.Tensor) -> torch.Tensor:
        """Forward only (held-out loss), with the parameters of epoch ``step``."""
        self.check_input("hidden_states", hidden)
        version = self._at_step(step)
        out = self.module(hidden.to(self.device))
        self._check_unchanged(step, version)
        return out

    def _served(self, kind: str, batch: int, started: float) -> None:
        if self.on_served is not None:
            self.on_served(kind, batch, time.perf_counter() - started)

    # --- life cycle ----------------------------------------------------------------------------------------
    def start(self, catch_up: bool = True, serve: bool = True) -> None:
        """Catch up with the replicas already training (if any), then serve and run epoch ends."""
        self.group.start(catch_up=catch_up)
        if serve:
            from peer.transport import SpanTransport

            self.transport = SpanTransport(self)
            self.transport.start()
        self._settled(self.epoch)

    def _settled(self, epoch: int) -> None:
        self.cache.drop_before(epoch)
        self.grads.drop_before(epoch)
        if self.on_epoch is not None:
            state = self.lora_state()
            if self.epoch == epoch:
                self.on_epoch(epoch, state)

    def _remote(self, peer_id: str, timeout: float) -> Any:
        from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

        from peer.remote import RemoteSpan

        if self._client_p2p is None:
            self._client_p2p = RemoteExpertWorker.run_coroutine(self.dht.replicate_p2p())
        return RemoteSpan(self._client_p2p, peer_id, self.uid, timeout=timeout)

    def download_state(self, peer_id: str) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """The training state of the replica ``peer_id`` of this span, over its span transport (``rpc_state``)."""
        return self._remote(peer_id, self.spec.optimizer.averaging_timeout).state()  # type: ignore[no-any-return]

    def contribution_of(self, peer_id: str, epoch: int) -> tuple[int, list[torch.Tensor]]:
        """What the replica ``peer_id`` of this span brought to the all-reduce of ``epoch`` (``rpc_contribution``)."""
        return self._remote(peer_id, self.spec.optimizer.averaging_timeout).contribution(epoch)  # type: ignore[no-any-return]

    def alive(self, peer_id: str) -> bool:
        """The replica ``peer_id`` answers ``rpc_info`` within 2 s."""
        try:
            self._remote(peer_id, ALIVE_TIMEOUT_S).info()
            return True
        except Exception:
            return False

    def lora_state(self) -> dict[str, torch.Tensor]:
        with self.lock:
            return export_lora_state(self.module)

    def shutdown(self) -> None:
        """Stop serving, stop epoch ends, leave the averaging group."""
        if self.transport is not None:
            self.transport.shutdown()
        self.group.shutdown()
