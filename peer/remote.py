"""Calling a span on another peer over the direct span transport (:mod:`peer.transport`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer

from peer.transport import SpanServicer, decode_parts, encode, wire_bytes
from swarm.steps import MicroBatchKey


class RemoteCallError(RuntimeError):
    """A remote span call failed or timed out (the caller may fail over to another replica)."""


class RemoteStaleStepError(RemoteCallError):
    """The replica is past the request's step (``epoch`` says where it is)."""

    def __init__(self, message: str, epoch: int):
        super().__init__(message)
        self.epoch = epoch


class RemoteMissingActivationsError(RemoteCallError):
    """The replica does not hold the forward's activations: resend the backward with the inputs."""


class RemoteBadOutputError(RemoteCallError):
    """The replica answered with something that is not a valid output (wrong shape, dtype or non-finite)."""


async def _messages(meta: dict[str, Any], parts: list[runtime_pb2.Tensor]) -> AsyncIterator[Any]:
    raw = MSGPackSerializer.dumps(meta)
    for i, part in enumerate(parts):
        yield runtime_pb2.ExpertRequest(metadata=raw if i == 0 else b"", tensors=[part])


async def _empty_request() -> AsyncIterator[Any]:
    yield runtime_pb2.ExpertRequest()


class RemoteSpan:
    """Handle to one replica of a span served by another peer."""

    def __init__(self, p2p: P2P, peer_id: str, uid: str, timeout: float, compression: str = "none"):
        self.peer_id, self.uid, self.timeout, self.compression = peer_id, uid, timeout, compression
        self.stub = SpanServicer.get_stub(p2p, PeerID.from_base58(peer_id), namespace=uid)
        self.on_wire: Callable[[int, int], None] = lambda sent, received: None  # wire bytes of each call

    async def _call(self, method: str, meta: dict[str, Any], parts: list[runtime_pb2.Tensor]) -> list[Any]:
        error = None
        stream = await getattr(self.stub, method)(_messages(meta, parts))
        parts = []
        try:
            async for response in stream:
                if response.metadata:
                    error = MSGPackSerializer.loads(response.metadata)
                parts.extend(response.tensors)
        except Exception:
            # A server that refuses a call answers before reading the request and closes the stream, so sending
            # the rest of the request can fail ("Connection lost") after the answer arrived: the answer decides.
            if error is None:
                raise
        if error is None and not parts:  # the stream ended before any result: a transport failure (retried)
            raise ConnectionError("the stream ended without an answer")
        if error is not None:
            kind, message = str(error.get("error", "")), str(error.get("message", ""))
            if kind == "StaleStepError":
                raise RemoteStaleStepError(f"{method} on {self.peer_id}: {message}", int(error.get("epoch", 0)))
            if kind == "MissingActivationsError":
                raise RemoteMissingActivationsError(message)
            raise RemoteCallError(f"{method} on {self.peer_id} refused: {kind}: {message}")
        return parts

    def _run(
        self, method: str, step: int, key: MicroBatchKey, tensors: list[torch.Tensor], like: torch.Tensor
    ) -> torch.Tensor:
        meta = {"step": step, "trainer": key[0], "mb": key[1], "compression": self.compression}
        parts = [p for t in tensors for p in encode(t, self.compression)]
        sent = wire_bytes(parts)
        what = f"{method} of {self.uid} on {self.peer_id}"
        answer = self._with_one_retry(lambda: self._call(method, meta, parts), what)
        self.on_wire(sent, wire_bytes(answer))
        try:
            out = decode_parts(answer, like.dtype)
        except Exception as exc:
            raise RemoteBadOutputError(f"{what}: undecodable output ({exc})") from exc
        if len(out) != 1 or out[0].shape != like.shape or not torch.isfinite(out[0]).all():
            shapes = [list(t.shape) for t in out]
            raise RemoteBadOutputError(
                f"{what}: bad output (shapes {shapes}, expected {list(like.shape)}, or non-finite)"
            )
        return out[0].to(like.device)

    def _with_one_retry(self, call: Callable[[], Any], what: str) -> Any:
        """Run the coroutine ``call()`` within ``timeout``; a transport failure (a stream reset, "Connection
        lost": seen on the first call over a connection both sides dialled at once) is retried once while
        time is left. Retrying is safe: a replica keeps one result per (step, trainer, micro-batch)."""
        deadline = time.monotonic() + self.timeout
        for attempt in (1, 2):
            future = RemoteExpertWorker.run_coroutine(call(), return_future=True)
            try:
                return future.result(timeout=max(deadline - time.monotonic(), 0.0))
            except TimeoutError as exc:
                future.cancel()
                raise RemoteCallError(f"{what} timed out after {self.timeout:.0f} s") from exc
            except RemoteCallError:
                raise
            except Exception as exc:
                if attempt == 2 or deadline - time.monotonic() < self.timeout / 2:
                    raise RemoteCallError(f"{what} failed: {exc}") from exc
        raise AssertionError("unreachable")

    async def _answer(self, method: str, request: dict[str, Any]) -> tuple[Any, list[Any]]:
        """Call ``method`` with one metadata-only message; its answer's metadata (the last sent) and tensor parts."""

        async def messages() -> AsyncIterator[Any]:
            yield runtime_pb2.ExpertRequest(metadata=MSGPackSerializer.dumps(request))

        meta: Any = None
        parts: list[Any] = []
        async for response in await getattr(self.stub, method)(messages()):
            if response.metadata:
                meta = MSGPackSerializer.loads(response.metadata)
            parts.extend(response.tensors)
        return meta, parts

    async def _state_call(self) -> tuple[dict[str, Any], list[Any]]:
        meta, parts = await self._answer("rpc_state", {})
        if not isinstance(meta, dict) or not isinstance(meta.get("state"), dict):
            kind = meta.get("error", "") if isinstance(meta, dict) else "no metadata"
            message = meta.get("message", "") if isinstance(meta, dict) else ""
            raise RemoteCallError(f"rpc_state on {self.peer_id} refused: {kind}: {message}")
        return meta["state"], parts

    def contribution(self, epoch: int) -> tuple[int, list[torch.Tensor]]:
        """What the replica brought to the all-reduce of ``epoch`` (samples, mean gradient: ``rpc_contribution``).

        Raises :class:`RemoteCallError` when it does not answer or refuses (it may not list us yet, or no longer
        keep that epoch), :class:`peer.replica_group.NotShownError` when it answers with something that is not a
        contribution."""
        from peer.replica_group import NotShownError

        meta, parts = self._with_one_retry(
            lambda: self._answer("rpc_contribution", {"epoch": epoch}), f"rpc_contribution on {self.peer_id}"
        )
        if isinstance(meta, dict) and "error" in meta:
            raise RemoteCallError(f"rpc_contribution on {self.peer_id} refused: {meta['error']}: {meta.get('message')}")
        samples = meta.get("samples") if isinstance(meta, dict) else None
        if not isinstance(samples, int) or isinstance(samples, bool):
            raise NotShownError(f"answered without a sample count ({meta!r:.200})")
        try:
            return samples, decode_parts(parts)
        except Exception as exc:
            raise NotShownError(f"undecodable tensors ({exc})") from exc

    def info(self) -> int:
        """The replica's epoch (``rpc_info``); raises RemoteCallError when it does not answer within ``timeout``."""

        async def call() -> int:
            answers = [answer async for answer in await self.stub.rpc_info(_empty_request())]
            return int(MSGPackSerializer.loads(answers[0].metadata)["epoch"])

        return self._with_one_retry(call, f"rpc_info on {self.peer_id}")  # type: ignore[no-any-return]

    def notify_closed(self) -> None:
        """Tell the replica that this trainer closed a step (``rpc_closed``), without waiting: a lost notice costs
        the replica a poll period, nothing else."""

        async def call() -> None:
            async for _ in await self.stub.rpc_closed(_empty_request()):
                pass

        future = RemoteExpertWorker.run_coroutine(asyncio.wait_for(call(), self.timeout), return_future=True)
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # failures are not reported

    def state(self) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """The replica's training state (for a replica of the same span that catches up)."""
        meta, parts = self._with_one_retry(self._state_call, f"rpc_state on {self.peer_id}")
        try:
            return meta, decode_parts(parts)
        except Exception as exc:
            raise RemoteBadOutputError(f"rpc_state on {self.peer_id}: undecodable state ({exc})") from exc

    def forward(self, step: int, key: MicroBatchKey, hidden: torch.Tensor) -> torch.Tensor:
        return self._run("rpc_forward", step, key, [hidden], hidden)

    def backward(self, step: int, key: MicroBatchKey, grad: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Backward using the replica's kept activations; resent with the inputs if it does not hold them."""
        try:
            return self._run("rpc_backward", step, key, [grad], grad)
        except RemoteMissingActivationsError:
            return self._run("rpc_backward", step, key, [grad, hidden], grad)

    def evaluate(self, step: int, hidden: torch.Tensor) -> torch.Tensor:
        return self._run("rpc_evaluate", step, ("", 0), [hidden], hidden)
