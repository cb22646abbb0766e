"""Calling a span on another peer: hivemind.moe RPCs with a timeout, inside an autograd Function."""

from __future__ import annotations

from typing import Any

import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.moe.client.expert import expert_backward, expert_forward
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from peer.backend import ValidatingConnectionHandler


class RemoteCallError(RuntimeError):
    """A remote span call failed or timed out (the caller may fail over to another replica)."""


def _run(coro: Any, timeout: float, what: str) -> list[torch.Tensor]:
    future = RemoteExpertWorker.run_coroutine(coro, return_future=True)
    try:
        return list(future.result(timeout=timeout))
    except TimeoutError as exc:
        future.cancel()
        raise RemoteCallError(f"{what} timed out after {timeout:.0f} s") from exc
    except Exception as exc:
        raise RemoteCallError(f"{what} failed: {exc}") from exc


class RemoteSpan:
    """Handle to one replica of a span served by another peer."""

    def __init__(self, p2p: P2P, peer_id: str, uid: str, timeout: float):
        self.peer_id, self.uid, self.timeout = peer_id, uid, timeout
        # Our servers register their handlers under ValidatingConnectionHandler's name.
        self.stub = ValidatingConnectionHandler.get_stub(p2p, PeerID.from_base58(peer_id))

    def _ser(self, tensors: tuple[torch.Tensor, ...]) -> list[runtime_pb2.Tensor]:
        return [serialize_torch_tensor(t) for t in tensors]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        inputs = (hidden.detach().cpu().contiguous(),)
        out = _run(
            expert_forward(self.uid, inputs, self._ser(inputs), self.stub),
            self.timeout,
            f"forward of {self.uid} on {self.peer_id}",
        )
        return out[0]

    def backward(self, hidden: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
        tensors = (hidden.detach().cpu().contiguous(), grad_output.detach().cpu().contiguous())
        out = _run(
            expert_backward(self.uid, tensors, self._ser(tensors), self.stub),
            self.timeout,
            f"backward of {self.uid} on {self.peer_id}",
        )
        return out[0]
