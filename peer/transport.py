"""Direct span transport: the span server answers forward/backward in its own process over hivemind's p2p layer.

A ``ServicerBase`` registers streaming handlers on a ``P2P`` replica of the peer's DHT daemon (no TaskPool or
connection-handler processes). Requests are validated (metadata, shape, dtype, finite values) before any
compute; compute runs in one worker thread, off the event loop. Tensors travel with the round's wire
compression (``hivemind.compression``), split into parts for streaming.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, AsyncIterator  # noqa: UP035 (hivemind's ServicerBase reads typing's hints)

import hivemind.compression.base
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import P2PContext, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils.logging import get_logger
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming

if TYPE_CHECKING:
    from peer.server import SpanServer

log = get_logger(__name__)
# hivemind sends bfloat16 as float32 unless told otherwise ("legacy" mode): keep it at 2 bytes per element. Peers in
# legacy mode still decode these tensors (the dtype travels with them).
hivemind.compression.base.USE_LEGACY_BFLOAT16 = False
PART_BYTES = 2 * 1024 * 1024
#: wire compression name -> (cast dtype before serializing or None, hivemind CompressionType)
WIRE_COMPRESSIONS: dict[str, tuple[torch.dtype | None, int]] = {
    "none": (None, runtime_pb2.CompressionType.NONE),
    "float16": (None, runtime_pb2.CompressionType.FLOAT16),
    "bfloat16": (torch.bfloat16, runtime_pb2.CompressionType.NONE),
    "uint8": (None, runtime_pb2.CompressionType.UNIFORM_8BIT),
}
MAX_METADATA_BYTES = 4096


def encode(tensor: torch.Tensor, compression: str) -> list[runtime_pb2.Tensor]:
    """Serialize ``tensor`` with a wire compression and split it into streaming parts."""
    cast, kind = WIRE_COMPRESSIONS[compression]
    t = tensor.detach().cpu()
    if cast is not None:
        t = t.to(cast)
    return list(split_for_streaming(serialize_torch_tensor(t.contiguous(), kind), PART_BYTES))


def wire_dtype(compression: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor of ``dtype`` arrives in with this wire compression (before casting back)."""
    cast, _ = WIRE_COMPRESSIONS[compression]
    return cast or dtype


def decode_parts(parts: Iterable[runtime_pb2.Tensor], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Tensors from streamed parts (a part with a dtype starts a new tensor), cast to ``dtype`` if given."""
    tensors: list[torch.Tensor] = []
    current: list[runtime_pb2.Tensor] = []
    for part in parts:
        if part.dtype and current:
            tensors.append(deserialize_torch_tensor(combine_from_streaming(current)))
            current = []
        current.append(part)
    if current:
        tensors.append(deserialize_torch_tensor(combine_from_streaming(current)))
    return [t if dtype is None else t.to(dtype) for t in tensors]


def wire_bytes(parts: Iterable[runtime_pb2.Tensor]) -> int:
    return sum(len(p.buffer) for p in parts)


def parse_metadata(raw: bytes) -> dict[str, Any]:
    """Request metadata: ``step`` (int >= 0), ``trainer`` (str), ``mb`` (int >= 0), ``compression`` (known name)."""
    from peer.server import BadRequestError

    if len(raw) > MAX_METADATA_BYTES:
        raise BadRequestError(f"metadata of {len(raw)} bytes exceeds {MAX_METADATA_BYTES}")
    try:
        meta = MSGPackSerializer.loads(raw)
    except Exception:
        raise BadRequestError("metadata is not valid msgpack") from None
    if not isinstance(meta, dict):
        raise BadRequestError("metadata must be a map")
    step, trainer, mb = meta.get("step"), meta.get("trainer", ""), meta.get("mb", 0)
    compression = meta.get("compression", "none")
    if not isinstance(step, int) or not 0 <= step < 2**31:
        raise BadRequestError(f"metadata step must be an int in [0, 2**31), got {step!r}")
    if not isinstance(trainer, str) or len(trainer) > 128:
        raise BadRequestError("metadata trainer must be a peer id string")
    if not isinstance(mb, int) or not 0 <= mb < 2**31:
        raise BadRequestError(f"metadata mb must be an int in [0, 2**31), got {mb!r}")
    if compression not in WIRE_COMPRESSIONS:
        raise BadRequestError(f"unknown wire compression {compression!r}; known: {sorted(WIRE_COMPRESSIONS)}")
    return {"step": step, "trainer": trainer, "mb": mb, "compression": compression}


#: what a refused call's unread request parts may cost before the answer goes out anyway
DRAIN_BYTES, DRAIN_SECONDS = 16 << 20, 2.0


async def _drain(requests: AsyncIterator[runtime_pb2.ExpertRequest]) -> None:
    """Read and drop what is left of a refused request (at most ``DRAIN_BYTES`` / ``DRAIN_SECONDS``; nothing is
    decoded or computed), so that the caller finishes sending and reads the refusal."""

    async def read() -> None:
        size = 0
        async for request in requests:
            size += sum(len(part.buffer) for part in request.tensors)
            if size > DRAIN_BYTES:
                return

    with contextlib.suppress(Exception):  # the stream closed or failed: nothing left to drain
        await asyncio.wait_for(read(), DRAIN_SECONDS)


class SpanServicer(ServicerBase):
    """p2p handlers of one span: forward, backward and eval, each a stream of ``ExpertRequest`` parts."""

    def __init__(self, server: SpanServer, pool: ThreadPoolExecutor):
        self.server, self.pool = server, pool

    async def _gather(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], names: tuple[str, ...]
    ) -> tuple[dict[str, Any], list]:
        from peer.server import BadRequestError

        meta: dict[str, Any] | None = None
        parts: list[runtime_pb2.Tensor] = []
        limit = self.server.max_batch_size * self.server.seq_len * self.server.hidden * 4 * 2 + (1 << 20)
        size = 0
        async for request in requests:
            if meta is None:
                meta = parse_metadata(request.metadata)
            for part in request.tensors:
                size += len(part.buffer)
                if size > limit:
                    raise BadRequestError(f"request exceeds {limit} bytes")
                parts.append(part)
        if meta is None:
            raise BadRequestError("empty request")
        try:
            tensors = decode_parts(parts)
        except Exception as exc:
            raise BadRequestError(f"tensors could not be decoded: {exc}") from None
        expected = wire_dtype(meta["compression"], self.server.dtype)
        for name, t in zip(names, tensors, strict=False):
            if t.dtype != expected:
                got, want = (str(d).removeprefix("torch.") for d in (t.dtype, expected))
                raise BadRequestError(f"{name} has dtype {got}, expected {want}")
        return meta, [t.to(self.server.dtype) for t in tensors]

    async def _admits(self, caller: str, span: tuple[int, int] | None = None) -> bool:
        """Whether the roster lists ``caller`` (for ``span``, if given); everyone where no roster decides."""
        members = self.server.members
        if not members.enforced:
            return True
        return bool(await asyncio.get_running_loop().run_in_executor(None, members.allows, caller, span))

    async def _compute(self, fn: Any, *args: Any) -> torch.Tensor:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)  # type: ignore[no-any-return]

    async def _serve(
        self, kind: str, requests: AsyncIterator[runtime_pb2.ExpertRequest], caller: str
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Run one call; an expected failure is answered as an error message (no traceback in the log).

        ``caller`` is the peer id libp2p authenticated; where a roster decides, only its members are served and
        a request's micro-batch key must name the caller as its trainer (one member cannot write another's)."""
        from peer.server import BadRequestError, MissingActivationsError, NotMemberError, StaleStepError

        server = self.server
        try:
            if not await self._admits(caller):
                server.refused_callers.add(caller)
                raise NotMemberError(caller)
            names = ("grad_outputs", "hidden_states") if kind == "backward" else ("hidden_states",)
            meta, tensors = await self._gather(requests, names)
            if server.members.enforced and kind != "evaluate" and meta["trainer"] != caller:
                raise BadRequestError(f"metadata trainer {meta['trainer']!r} is not the caller {caller}")
            key = (meta["trainer"], meta["mb"])
            # Wait for the request's step outside the one compute thread: a request for the next step must not
            # hold up the current step's requests queued behind it (no thread hop when the step is current).
            if server.group.epoch < meta["step"]:
                await asyncio.get_running_loop().run_in_executor(
                    None, server.group.wait_for, meta["step"], server.request_wait
                )
            if kind == "forward":
                _expect(tensors, 1)
                out = await self._compute(server.forward, meta["step"], key, tensors[0])
            elif kind == "backward":
                if len(tensors) not in (1, 2):
                    _expect(tensors, 2)
                hidden = tensors[1] if len(tensors) == 2 else None
                out = await self._compute(server.backward, meta["step"], key, tensors[0], hidden)
            else:
                _expect(tensors, 1)
                out = await self._compute(server.evaluate, meta["step"], tensors[0])
        except (BadRequestError, MissingActivationsError, NotMemberError, StaleStepError, TimeoutError) as exc:
            error = {"error": type(exc).__name__, "message": str(exc), "epoch": server.epoch}
            await _drain(requests)  # else the caller's next write fails ("Broken pipe") before it reads the answer
            yield runtime_pb2.ExpertResponse(metadata=MSGPackSerializer.dumps(error))
            return
        for part in encode(out, meta["compression"]):
            yield runtime_pb2.ExpertResponse(tensors=[part])

    async def rpc_forward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for response in self._serve("forward", requests, str(context.remote_id)):
            yield response

    async def rpc_backward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for response in self._serve("backward", requests, str(context.remote_id)):
            yield response

    async def rpc_evaluate(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for response in self._serve("evaluate", requests, str(context.remote_id)):
            yield response

    async def rpc_info(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """``{"epoch": e}``, answered at once (a replica checks that a group member it waits for is still there).

        A stream handler like the others: hivemind's unary handlers share one persistent connection to p2pd per
        process, and registering one from a second P2P replica of the same daemon hung (60 s) in a peer that had
        already made calls from another replica."""
        async for _ in requests:
            pass
        yield runtime_pb2.ExpertResponse(metadata=MSGPackSerializer.dumps({"epoch": self.server.epoch}))

    async def rpc_closed(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """A trainer's notice that it closed a step: the replica reads the step records now instead of at its next
        poll. It carries nothing to trust (the records in the DHT decide); where a roster decides, only members
        wake the replica, and a flood costs at most one DHT read per ``READ_GAP_S``."""
        async for _ in requests:
            pass
        if await self._admits(str(context.remote_id)):
            self.server.group.wake()
        yield runtime_pb2.ExpertResponse()

    async def rpc_contribution(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """What this replica brought to an epoch's all-reduce, for a replica of the same span whose result was
        inconsistent (``ReplicaGroup.recompute``): request metadata ``{"epoch": e}``; the first answer's metadata
        is ``{"samples": n}``, then the mean gradient's tensors (exact)."""
        from peer.server import NotMemberError

        epoch: Any = None
        async for request in requests:  # one small message: nothing after it is read
            if len(request.metadata) <= MAX_METADATA_BYTES:
                with contextlib.suppress(Exception):
                    epoch = MSGPackSerializer.loads(request.metadata).get("epoch")
            break
        server, caller = self.server, str(context.remote_id)
        kept = None
        if not await self._admits(caller, (server.span.start, server.span.end)):
            server.refused_callers.add(caller)
            error = {"error": "NotMemberError", "message": str(NotMemberError(caller))}
        elif not isinstance(epoch, int) or isinstance(epoch, bool):
            error = {"error": "BadRequestError", "message": "metadata must be {'epoch': int}"}
        elif (kept := server.group.shown(epoch)) is None:
            error = {"error": "NotKeptError", "message": f"no contribution kept for epoch {epoch}"}
        if kept is None:
            yield runtime_pb2.ExpertResponse(metadata=MSGPackSerializer.dumps({**error, "epoch": server.epoch}))
            return
        samples, tensors = kept
        yield runtime_pb2.ExpertResponse(metadata=MSGPackSerializer.dumps({"samples": samples}))
        for t in tensors:
            for part in encode(t, "none"):
                yield runtime_pb2.ExpertResponse(tensors=[part])

    async def rpc_state(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """This replica's training state (epoch, LoRA parameters, optimizer state) for a replica of the same span
        that catches up: the first message's metadata is ``{"state": <metadata>}``, then the tensors (exact)."""
        from peer.server import NotMemberError

        async for _ in requests:  # the request carries nothing
            pass
        server, caller = self.server, str(context.remote_id)
        loop = asyncio.get_running_loop()
        span = (server.span.start, server.span.end)
        if not await self._admits(caller, span):
            server.refused_callers.add(caller)
            message = {"error": "NotMemberError", "message": str(NotMemberError(caller)), "epoch": server.epoch}
            yield runtime_pb2.ExpertResponse(metadata=MSGPackSerializer.dumps(message))
            return
        metadata, tensors = await loop.run_in_executor(None, server.group.state)
        yield runtime_pb2.ExpertResponse(metadata=MSGPackSerializer.dumps({"state": metadata}))
        for t in tensors:
            for part in encode(t, "none"):
                yield runtime_pb2.ExpertResponse(tensors=[part])


def _expect(tensors: list[torch.Tensor], n: int) -> None:
    from peer.server import BadRequestError

    if len(tensors) != n:
        raise BadRequestError(f"expected {n} tensor(s), got {len(tensors)}")


class SpanTransport:
    """Runs a :class:`SpanServicer` on its own event loop thread, on a P2P replica of the peer's daemon."""

    def __init__(self, server: SpanServer):
        self.server = server
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=f"span-{server.span.name}")
        self.servicer = SpanServicer(server, self.pool)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="span-transport", daemon=True)
        self._p2p: Any = None

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=60)

    async def _start(self) -> None:
        self._p2p = await self.server.dht.replicate_p2p()
        await self.servicer.add_p2p_handlers(self._p2p, namespace=self.server.uid)

    def shutdown(self) -> None:
        if self._p2p is not None and self.loop.is_running():
            try:
                fut = asyncio.run_coroutine_threadsafe(
                    self.servicer.remove_p2p_handlers(self._p2p, namespace=self.server.uid), self.loop
                )
                fut.result(timeout=5)
            except Exception as exc:
                log.debug(f"removing span handlers: {exc!r}")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.pool.shutdown(wait=False, cancel_futures=True)
